"""Plumbing the training scripts share: adapter arguments, optimizer and schedule, output folders that
never mix two runs, checkpoints that resume. Checkpoints hold only what training changes (trainable
parameters, optimizer, scheduler, step, RNG), never the frozen base, and only tensors and plain data:
they load with ``torch.load(weights_only=True)``, so a planted checkpoint cannot run code."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pickle
import random
import re
import shutil
import signal
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from .adapters import METHODS
from .config import AdapterConfig
from .files import atomic_folder
from .inject import parameter_groups

# help of the flags many scripts share (diffusers' and transformers' names); a script's own flags carry
# their help where they are defined
FLAG_HELP = {
    "pretrained_model_name_or_path": "a diffusers pipeline folder or hub id (default: the embedded tiny pipeline)",
    "model_name_or_path": "a local model folder or hub id",
    "output_dir": "where checkpoints, adapters and results go (refused if it holds another run)",
    "seed": "random seed (data order, noise, initialisation)",
    "seeds": "one run per seed",
    "learning_rate": "peak learning rate",
    "lr": "learning rate",
    "weight_decay": "AdamW weight decay",
    "train_batch_size": "examples per step and process",
    "eval_batch_size": "examples per evaluation batch",
    "batch_size": "examples per batch",
    "gradient_accumulation_steps": "batches accumulated per optimizer step",
    "max_train_steps": "optimizer steps to train",
    "epochs": "passes over the training data",
    "warmup_ratio": "share of the steps with linear learning-rate warm-up",
    "lr_scheduler": "learning-rate schedule (diffusers' names)",
    "lr_warmup_steps": "warm-up steps of the schedule",
    "max_grad_norm": "gradient clipping norm",
    "mixed_precision": "autocast dtype; adapters stay fp32",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, more time)",
    "checkpointing_steps": "write a resumable checkpoint every N steps",
    "checkpointing_epochs": "write a resumable checkpoint every N epochs",
    "checkpoints_total_limit": "keep at most this many checkpoints (oldest removed)",
    "resume_from_checkpoint": "'latest' (the newest complete checkpoint in --output_dir) or a checkpoint-<step> "
                              "folder",
    "report_to": "accelerate trackers: none, tensorboard, wandb, …",
    "targets": "target-module preset of the model family",
    "unet_targets": "UNet layers to adapt (preset)",
    "text_encoder_targets": "text-encoder layers to adapt (preset)",
    "device": "cpu or cuda",
    "data_root": "dataset folder",
    "cache_dir": "cache of image embeddings (reused across runs)",
    "image_size": "input resolution",
    "num_workers": "data-loading worker processes",
    "dataloader_num_workers": "data-loading worker processes",
    "validation_prompt": "prompt of the validation images",
    "validation_steps": "draw validation images every N steps",
    "num_validation_images": "validation images per check",
    "num_inference_steps": "denoising steps of validation/generated images",
    "steps": "denoising steps",
    "guidance_scale": "classifier-free guidance scale",
    "backbone_source": "where the backbone comes from: transformers (hub id or folder) or timm",
    "timm_checkpoint": "local weights for a timm backbone",
    "max_length": "tokens per example (longer ones truncated)",
    "out": "output file or folder",
}


def describe_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every flag of ``parser`` without help its shared help text (:data:`FLAG_HELP`), with the
    default shown."""
    for action in parser._actions:
        if action.help is None and action.dest in FLAG_HELP:
            action.help = FLAG_HELP[action.dest] + (" (default: %(default)s)" if action.default not in (None, False)
                                                    else "")
    return parser


def add_adapter_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                          allow_none: bool = False) -> None:
    """The adapter flags every script shares, generated from the registry and the configs' fields:
    ``--adapter`` and ``--<method>_<field>`` for each hyperparameter (``--boft_block_size``,
    ``--oft_block_num``, ``--lora_alpha``, …), with the config's help and the published recipe's
    default. ``allow_none`` adds ``--adapter none`` (train only the task head: a linear probe)."""
    g = parser.add_argument_group("adapter")
    g.add_argument("--adapter", choices=list(METHODS) + (["none"] if allow_none else []), default="boft",
                   help="the adapter method (default: %(default)s)")
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            if "help" not in f.metadata:
                continue
            default = method.config.CLI_DEFAULTS.get(f.name, f.default)
            flag, kind = f"--{method.cli_prefix}_{f.name}", {"int": int, "float": float, "bool": bool}[f.type]
            if kind is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{method.name}: {f.metadata['help']} (default: %(default)s)")
            else:
                g.add_argument(flag, type=kind, default=default, metavar=f.name.upper(),
                               help=f"{method.name}: {f.metadata['help']} (default: %(default)s)")
    g.add_argument("--vblora_bank_lr", type=float, default=None, help="vblora: bank learning rate "
                   "(default: --learning_rate)")
    g.add_argument("--vblora_logits_lr", type=float, default=None, help="vblora: logits learning rate "
                   "(default: 10 × --learning_rate)")
    if defaults:
        parser.set_defaults(**defaults)


def adapter_config_from_args(args: argparse.Namespace, target_modules,
                             base_model_name_or_path: str | None = None) -> AdapterConfig:
    """The config of ``--adapter`` from its ``--<method>_<field>`` flags (a block number replaces the
    block size); ``base_model_name_or_path`` is recorded in the saved adapter_config.json."""
    method = METHODS[args.adapter]
    values = {f.name: getattr(args, f"{method.cli_prefix}_{f.name}")
              for f in dataclasses.fields(method.config) if "help" in f.metadata}
    ignored = []
    for other in (m for m in METHODS.values() if m is not method):
        for f in dataclasses.fields(other.config):
            default = other.config.CLI_DEFAULTS.get(f.name, f.default)
            if "help" in f.metadata and getattr(args, f"{other.cli_prefix}_{f.name}", default) != default:
                ignored.append(f"--{other.cli_prefix}_{f.name}")
    if ignored:
        warnings.warn(f"--adapter {args.adapter} ignores {', '.join(ignored)} (flags of other methods)", stacklevel=2)
    default_size = method.config.CLI_DEFAULTS.get("block_size")
    if values.get("block_num") and values.get("block_size") not in (0, default_size):
        raise ValueError(f"give one of --{method.cli_prefix}_block_size ({values['block_size']}) and "
                         f"--{method.cli_prefix}_block_num ({values['block_num']}), not both")
    if values.get("block_num"):
        values["block_size"] = 0
    return method.config(target_modules=target_modules, base_model_name_or_path=base_model_name_or_path,
                         revision=getattr(args, "revision", None), **values)


def make_optimizer(model: nn.Module, args: argparse.Namespace, lr: float, weight_decay: float):
    """AdamW over :func:`~boftvision.parameter_groups` (``--adam_beta1/2``, ``--adam_epsilon`` when the
    script has them; bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``)."""
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay,
                              vector_bank_lr=args.vblora_bank_lr or lr, logits_lr=args.vblora_logits_lr or 10 * lr)
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(getattr(args, "adam_beta1", 0.9),
                                                           getattr(args, "adam_beta2", 0.999)),
                  eps=getattr(args, "adam_epsilon", 1e-8))
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes as bnb  # checked by check_requirements before training

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def add_diffusers_training_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of diffusers' example training scripts that every diffusion script here takes with
    their meaning and default (the adapter's own flags come from :func:`add_adapter_arguments`)."""
    g = p.add_argument_group("diffusers training flags")
    g.add_argument("--num_train_epochs", type=int, default=1,
                   help="epochs to train when --max_train_steps is not given (diffusers' rule)")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1 (default: %(default)s)")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2 (default: %(default)s)")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε (default: %(default)s)")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes)")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rate by batch size × accumulation × processes")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="validate every N epochs (converted to steps; --validation_steps wins when given)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (needs xformers; PyTorch's SDPA is used otherwise)")
    g.add_argument("--revision", default=None, help="hub revision of the base model")
    g.add_argument("--variant", default=None, help="weights variant of the base model (e.g. fp16)")
    g.add_argument("--tokenizer_name", default=None, help="load the tokenizer from here instead of the model")
    g.add_argument("--logging_dir", default="logs", help="tracker logs, under --output_dir")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate reads the environment")
    g.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to the hub after training")
    g.add_argument("--hub_model_id", default=None, help="hub repo for --push_to_hub (default: output_dir's name)")
    g.add_argument("--hub_token", default=None, help="hub token for --push_to_hub (default: the logged-in one)")


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def check_requirements(args: argparse.Namespace) -> None:
    """Fail before training, naming the fix, when a flag needs something absent."""
    import importlib.util

    def missing(module: str) -> bool:
        return importlib.util.find_spec(module) is None

    if getattr(args, "use_8bit_adam", False) and missing("bitsandbytes"):
        raise SystemExit("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (GPU), or drop the flag")
    if getattr(args, "enable_xformers_memory_efficient_attention", False) and missing("xformers"):
        raise SystemExit("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); "
                         "without it PyTorch's scaled-dot-product attention is already used — drop the flag")
    trackers = [] if args.report_to in (None, "none") else \
        list(TRACKER_PACKAGES) if args.report_to == "all" else [args.report_to]
    for tracker in trackers:
        package = TRACKER_PACKAGES.get(tracker)
        if package is None:
            raise SystemExit(f"--report_to {tracker}: unknown tracker; use one of {sorted(TRACKER_PACKAGES)}, all or "
                             "none")
        if args.report_to != "all" and missing(package):
            raise SystemExit(f"--report_to {tracker} needs {package}: pip install {package} (or --report_to none)")
    if getattr(args, "push_to_hub", False):
        from huggingface_hub import get_token

        if not (args.hub_token or get_token()):
            raise SystemExit("--push_to_hub needs a hub token: huggingface-cli login, or --hub_token")


def add_report_to_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report_to", default="none",
                   help="tracker for the loss and metrics: tensorboard, wandb, all or none (default: %(default)s)")


def start_trackers(accelerator, args: argparse.Namespace, project: str) -> None:
    """Trackers of ``--report_to`` (checked before training by :func:`check_requirements`), configured
    with the run's settings (secrets left out)."""
    if args.report_to not in (None, "none") and accelerator.is_main_process:
        accelerator.init_trackers(project, config=run_settings(args))


def tracked_accelerator(args: argparse.Namespace, project: str, **kwargs):
    """An Accelerator logging to ``--report_to`` under ``output_dir/logs``, trackers started."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_requirements(args)
    out = Path(args.output_dir)
    accelerator = Accelerator(log_with=None if args.report_to in (None, "none") else args.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
                              **kwargs)
    start_trackers(accelerator, args, project)
    return accelerator


def save_loss_plot(path: str | Path, losses: list[float], xlabel: str = "step",
                   title: str = "training loss") -> Path | None:
    """``loss.png`` beside results.json (matplotlib; one line saying how to get it when it is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss.png not written: pip install matplotlib (or the logging extra)")
        return None
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def push_to_hub(args: argparse.Namespace) -> str:
    """Upload ``--output_dir`` (adapters, results, validation images; no checkpoints) to the hub."""
    from huggingface_hub import create_repo, upload_folder

    repo = args.hub_model_id or Path(args.output_dir).name
    create_repo(repo, token=args.hub_token, exist_ok=True)
    upload_folder(repo_id=repo, folder_path=args.output_dir, token=args.hub_token,
                  ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*"])
    return repo


def diffusers_step_counts(args: argparse.Namespace, batches_per_epoch: int, num_processes: int) -> None:
    """diffusers' rules: ``--max_train_steps`` from ``--num_train_epochs`` when not given, validation every
    ``--validation_epochs`` epochs as steps, ``--scale_lr``."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    if args.validation_steps is None:
        args.validation_steps = args.validation_epochs * updates_per_epoch if args.validation_epochs else 100
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base lr, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Every RNG's state as tensors, lists and numbers (what ``weights_only`` loading accepts)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss],
            "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler, step: int,
                    extra: dict | None = None, keep: int | None = None) -> Path:
    """``folder/checkpoint-{step}/training_state.pt`` + ``state.json``: trainable parameters (by name),
    optimizer, scheduler, step, RNG. Written into a temporary sibling and renamed, so a kill never
    leaves a half-written ``checkpoint-{step}``. ``keep`` limits how many stay (oldest removed)."""
    path = Path(folder) / f"checkpoint-{step}"
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    bad = next((n for n, t in trainable.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad:
        raise TrainingDiverged(f"step {step}: parameter {bad} is not finite; not writing checkpoint-{step} (the "
                               "newest complete checkpoint stays the latest); lower --learning_rate and resume")
    with atomic_folder(path) as tmp:
        torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "step": step, "rng": _rng_state()}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({**(extra or {}), "step": step}, indent=2))
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    found = [p for p in Path(folder).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (what a kill during a write by another tool, or a copy
    cut short, leaves), or None."""
    state, json_file = path / "training_state.pt", path / "state.json"
    if not state.is_file():
        return "no training_state.pt"
    if not zipfile.is_zipfile(state):
        return "training_state.pt is truncated"
    try:
        json.loads(json_file.read_text())
    except (OSError, ValueError):
        return "state.json is missing or unreadable"
    return None


def resolve_checkpoint(folder: str | Path, resume: str | None) -> Path | None:
    """``latest`` → the newest *complete* checkpoint in ``folder`` (None when there is none), naming
    each incomplete one it skips; else the given path, which must be complete."""
    if not resume:
        return None
    if resume == "latest":
        for path in reversed(list_checkpoints(folder)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            warnings.warn(f"skipping incomplete checkpoint {path} ({problem}); resuming from an older one",
                          stacklevel=2)
        print(f"--resume_from_checkpoint latest: no checkpoint in {folder} yet, starting fresh")
        return None
    path = Path(resume)
    if not path.exists() and (Path(folder) / resume).exists():  # a bare name: in output_dir, as diffusers does
        path = Path(folder) / resume
    problem = checkpoint_problem(path)
    if problem:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: not a complete checkpoint ({problem}); give "
                                "a checkpoint-<step> folder or 'latest' (the newest complete one)")
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, scheduler, settings: dict | None = None,
                    say=print) -> dict:
    """Restore what :func:`save_checkpoint` wrote into an identically built model; returns state.json.

    Loads tensors and plain data only (``weights_only=True``): a checkpoint holding any other pickled
    object is refused before it can run anything. With ``settings`` (:func:`run_settings`), a checkpoint
    of a run with other settings is refused first (see :func:`check_resume_settings`)."""
    if settings is not None:
        saved = json.loads((Path(path) / "state.json").read_text()).get("settings")
        check_resume_settings(saved, settings, Path(path), say)
    try:
        state = torch.load(Path(path) / "training_state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"checkpoint {path} holds pickled objects other than tensors and plain data, which could "
                         "run code when loaded; refusing it. Checkpoints written by boftvision hold only tensors: "
                         "delete this one (or resume from another) if you did not make it yourself") from err
    params = dict(model.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} holds parameters this model lacks: {missing[:3]}; was it made "
                         "with other adapter settings?")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return json.loads((Path(path) / "state.json").read_text())


def claim_output_dir(output_dir: str | Path, overwrite: bool = False, resume: str | None = None,
                     keep: tuple = ()) -> Path:
    """Make sure a run never mixes with another one in ``output_dir``.

    An empty or new folder is taken as it is; a folder holding a run (any file besides the ``keep``
    paths, e.g. a class-image folder the user put inside it) is refused unless this run resumes it
    (``resume`` given and a checkpoint in it or in a run folder below it) or ``overwrite`` is set,
    which deletes everything but ``keep`` first. In a multi-process launch every process checks and
    the main process deletes.
    """
    from accelerate import PartialState

    out = Path(output_dir)
    keep_paths = {Path(k).resolve() for k in keep if k}
    others = [p for p in out.iterdir() if p.resolve() not in keep_paths] if out.is_dir() else []
    # "latest" resumes when the folder holds a checkpoint (at the top, or in a per-task/seed run folder)
    resuming = resume is not None and (resume != "latest" or any(
        p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) for p in out.rglob("checkpoint-*")))
    if others and not resuming and not overwrite:
        names = sorted(p.name for p in others)
        listed = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        raise FileExistsError(f"output_dir {out} holds another run ({listed}); "
                              "pass --overwrite_output_dir to replace it, --resume_from_checkpoint latest to "
                              "continue it, or choose another --output_dir")
    state = PartialState()
    if others and overwrite and not resuming and state.is_main_process:
        for p in others:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    state.wait_for_everyone()
    try:  # an unwritable output_dir is found now, not at the first checkpoint
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-") as probe:
            probe.write(b"0" * 4096)
            probe.flush()
    except OSError as err:
        raise OSError(f"output_dir {out} cannot be written ({err}); fix its permissions or free space, or "
                      "choose another --output_dir") from err
    return out


def prepare_epochs(accelerator, model: nn.Module, optimizer, train_loader, eval_loader, epochs: int,
                   warmup_ratio: float, run_dir: str | Path, resume: str | None,
                   settings: dict | None = None) -> SimpleNamespace:
    """Cosine schedule over ``epochs``, ``accelerator.prepare``, and resume from ``run_dir`` when asked.

    Returns the prepared objects plus ``steps_per_epoch``, ``total`` and ``state`` (the resumed
    checkpoint's state.json; ``{"epoch": 0}`` on a fresh start)."""
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total = steps_per_epoch * epochs
    scheduler = cosine_with_warmup(optimizer, int(warmup_ratio * total), total)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    state = {"epoch": 0}
    checkpoint = resolve_checkpoint(run_dir, resume)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, settings,
                                accelerator.print)
        accelerator.print(f"resumed from {checkpoint} (epoch {state['epoch']})")
    return SimpleNamespace(model=model, optimizer=optimizer, train_loader=train_loader, eval_loader=eval_loader,
                           scheduler=scheduler, steps_per_epoch=steps_per_epoch, total=total, state=state)


def accelerator_from_args(args: argparse.Namespace):
    """The step-based scripts' Accelerator: accumulation, mixed precision, trackers (``--report_to``)
    logging under ``output_dir/logs``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    check_requirements(args)
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision,
                       log_with=None if args.report_to in (None, "none") else args.report_to,
                       project_config=ProjectConfiguration(
                           project_dir=str(out), logging_dir=str(out / getattr(args, "logging_dir", "logs"))))


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops before the optimizer applies it."""


def stop_if_diverged(loss: torch.Tensor, step: int) -> None:
    """For the epoch-based loops: a non-finite loss stops the run before its step is applied."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise TrainingDiverged(f"step {step}: the loss is {loss.detach().float().mean().item()!r}; stopping before "
                               "it is applied. Lower --learning_rate and resume with --resume_from_checkpoint "
                               "latest (the newest checkpoint holds finite weights)")


# flags a resumed run may change; any other difference from the checkpoint's run is refused
SAFE_TO_CHANGE = {
    "learning_rate", "max_train_steps", "num_train_epochs", "epochs", "checkpointing_steps", "checkpointing_epochs",
    "checkpoints_total_limit",
    "validation_prompt", "validation_steps", "validation_epochs", "num_validation_images", "num_inference_steps",
    "guidance_scale", "report_to", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "output_dir",
    "dataloader_num_workers", "max_nonfinite_steps", "vblora_bank_lr", "vblora_logits_lr", "validation_image",
    "skip_bad_files", "push_to_hub", "hub_model_id", "local_rank", "no_tracemalloc", "set_grads_to_none",
    "wandb_project_name", "wandb_run_name",
}
SECRETS = ("hub_token", "wandb_key")  # never written to checkpoints or trackers


def run_settings(args: argparse.Namespace) -> dict:
    """The run's flags as plain data, without the flags of adapter methods it does not use."""
    others = tuple(f"{m.cli_prefix}_" for name, m in METHODS.items() if name != getattr(args, "adapter", None))
    return {k: v for k, v in sorted(vars(args).items())
            if isinstance(v, (str, int, float, bool, type(None))) and not k.startswith(others) and k not in SECRETS}


def check_resume_settings(saved: dict | None, now: dict, checkpoint: Path, say=print) -> None:
    """Refuse to resume a run with other settings (naming each one, the checkpoint's value and the new
    one); changes in :data:`SAFE_TO_CHANGE` are allowed and printed."""
    if not saved:
        return
    changed = {k for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
    unsafe = sorted(k for k in changed if k not in SAFE_TO_CHANGE)
    if unsafe:
        lines = [f"--{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in unsafe]
        raise ValueError(f"cannot resume {checkpoint} with other settings:\n  " + "\n  ".join(lines) +
                         "\nuse the checkpoint's values, or start a new run (another --output_dir or "
                         "--overwrite_output_dir)")
    for k in sorted(changed):
        say(f"resuming with --{k} changed: {saved.get(k)!r} → {now.get(k)!r}")


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM (what SLURM and cloud preemption send) and SIGINT
    (Ctrl-C) set ``stop.signal`` instead of killing the process, so the loop can finish its step and
    write a checkpoint; a second signal acts as usual. A no-op outside the main thread."""

    def __init__(self):
        self.signal: int | None = None
        self._saved = {}

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._saved.get(signum, signal.SIG_DFL))  # the next one is not caught

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


class EpochBatches:
    """One epoch of a shuffled loader that can stop and resume in the middle.

    ``rng`` is the torch RNG state the epoch's shuffle is drawn from. Given a mid-epoch checkpoint's
    ``partial`` (``{"rng": …, "batches_done": k}``), the same order is drawn again, the first k batches
    are skipped, and the RNG continues from the checkpoint's state — so the resumed epoch equals the
    uninterrupted one (data loading must draw no random numbers, as in the VTAB and GLUE recipes).
    """

    def __init__(self, loader, partial: dict | None = None):
        self.loader = loader
        self.rng = partial["rng"] if partial else torch.get_rng_state().tolist()
        self.done = partial["batches_done"] if partial else 0

    def __iter__(self):
        now = torch.get_rng_state()
        torch.set_rng_state(torch.tensor(self.rng, dtype=torch.uint8))
        iterator = iter(self.loader)
        first = next(iterator, None)  # the shuffle draws its seed here
        torch.set_rng_state(now)
        if first is None:
            return
        skip = self.done
        for index, batch in enumerate(itertools.chain([first], iterator)):
            if index < skip:
                continue
            self.done = index + 1
            yield batch

    def state(self, **more) -> dict:
        """What a mid-epoch checkpoint records (``extra["partial"]``)."""
        return {"rng": self.rng, "batches_done": self.done, **more}


def exit_for_signal(stop: "StopSignals", accelerator, step: int, resume_from: Path | None, progress=None) -> None:
    """The loops of the scripts without :func:`train_steps`, on SIGTERM/SIGINT, after they wrote a
    checkpoint at ``step``: say where to resume and exit with status 128 + the signal's number."""
    if progress is not None:
        progress.close()
    name = signal.Signals(stop.signal).name
    accelerator.print(f"\n{name}: stopped after step {step}; checkpoint written to {resume_from}. Continue with "
                      "the same command plus --resume_from_checkpoint latest")
    raise SystemExit(128 + int(stop.signal))


def train_steps(accelerator, args: argparse.Namespace, trained: nn.Module, models: list, optimizer, scheduler,
                loader, loss_fn, validate=None) -> SimpleNamespace:
    """The optimizer-step loop of the step-based scripts (DreamBooth, control), prepared objects given.

    Resumes from ``--resume_from_checkpoint`` (``latest``: the newest complete checkpoint under
    ``output_dir``), refusing other settings, continuing mid-epoch with the batches the interrupted
    epoch had not seen; then per batch: ``loss_fn(batch)`` under ``accumulate(*models)``, backward,
    gradient clipping (``--max_grad_norm``), optimizer and scheduler step; per optimizer step: progress
    bar, tracker log, a checkpoint every ``--checkpointing_steps`` and ``validate(step)`` (→ a saved
    path) every ``--validation_steps``. Returns ``step``, ``losses``, ``validations`` and ``seconds``.

    Faults: a non-finite loss or gradient norm is never applied; more than ``--max_nonfinite_steps``
    (default 0) in a row raise :class:`TrainingDiverged` naming the step and the value (fp16's loss
    scaler skipping a step with an inf gradient is not counted). SIGTERM or SIGINT finish the current
    step, write a checkpoint and exit with status 128 + the signal's number.
    """
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    step, losses = 0, []
    settings = run_settings(args)
    checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trained, optimizer, scheduler, settings, accelerator.print)
        step, losses = state["step"], state.get("losses", [])
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    allowed_nonfinite = getattr(args, "max_nonfinite_steps", 0)
    bar = tqdm(range(args.max_train_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    start, validations, nonfinite = time.time(), [], 0

    def checkpoint_now():
        if accelerator.is_main_process:
            save_checkpoint(out, trained, optimizer, scheduler, step, {"losses": losses, "settings": settings},
                            keep=args.checkpoints_total_limit)

    with StopSignals() as stop:
        while step < args.max_train_steps:
            skip = (step % updates_per_epoch) * args.gradient_accumulation_steps  # resumed mid-epoch
            for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
                with accelerator.accumulate(*models):
                    loss = loss_fn(batch)
                    accelerator.backward(loss)
                    norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm) \
                        if accelerator.sync_gradients else None
                    bad_loss = not bool(torch.isfinite(loss.detach()).all())
                    bad_norm = norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)))
                    scaler_skips = accelerator.scaler is not None and bad_norm and not bad_loss
                    flags = accelerator.gather(torch.tensor([[float(bad_loss or (bad_norm and not scaler_skips)),
                                                              float(stop.signal is not None)]],
                                                            device=accelerator.device)).amax(dim=0)
                    bad, stopping = bool(flags[0]), bool(flags[1])
                    if bad:  # never applied: the weights stay finite
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                if bad:
                    nonfinite += 1
                    if nonfinite > allowed_nonfinite:
                        last = resolve_checkpoint(out, "latest") if accelerator.is_main_process else None
                        raise TrainingDiverged(
                            f"step {step + 1}: the loss is {loss.item()!r}, the gradient norm "
                            f"{float(norm) if norm is not None else 'not computed'}; stopping before it is "
                            f"applied ({nonfinite} non-finite step(s) in a row, --max_nonfinite_steps "
                            f"{allowed_nonfinite}). Last checkpoint: {last or 'none'}; lower --learning_rate "
                            "(or use bf16 rather than fp16) and resume with --resume_from_checkpoint latest")
                    continue
                if not accelerator.sync_gradients:
                    continue
                nonfinite = 0
                step += 1
                losses.append(accelerator.gather(loss.detach()).mean().item())
                lr = scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"loss": losses[-1], "lr": lr}, step=step)
                if stopping:
                    checkpoint_now()
                    accelerator.wait_for_everyone()
                    name = signal.Signals(stop.signal or signal.SIGTERM).name
                    accelerator.print(f"\n{name}: stopped after step {step}; checkpoint written to "
                                      f"{out / f'checkpoint-{step}'}. Continue with the same command plus "
                                      "--resume_from_checkpoint latest")
                    raise SystemExit(128 + int(stop.signal or signal.SIGTERM))
                if step % args.checkpointing_steps == 0:
                    checkpoint_now()
                if validate is not None and step % args.validation_steps == 0 and accelerator.is_main_process:
                    validations.append(str(validate(step)))
                if step >= args.max_train_steps:
                    break
    accelerator.wait_for_everyone()
    return SimpleNamespace(step=step, losses=losses, validations=validations, seconds=round(time.time() - start, 1))
