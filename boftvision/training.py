"""Plumbing the training scripts share: adapter arguments, optimizer and schedule, output folders that
never mix two runs, checkpoints that resume. Checkpoints hold only what training changes (trainable
parameters, optimizer, scheduler, step, RNG), never the frozen base, and only tensors and plain data:
they load with ``torch.load(weights_only=True)``, so a planted checkpoint cannot run code."""
from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from .config import AdapterConfig, BOFTConfig, LoRAConfig, OFTConfig, VBLoRAConfig
from .files import atomic_folder
from .inject import parameter_groups


def add_adapter_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                          allow_none: bool = False) -> None:
    """The adapter flags every script shares (PEFT's example-script names); ``allow_none`` adds
    ``--adapter none`` (train only the task head: a linear probe)."""
    g = parser.add_argument_group("adapter")
    g.add_argument("--adapter", choices=["boft", "oft", "lora", "vblora"] + (["none"] if allow_none else []),
                   default="boft")
    g.add_argument("--boft_block_size", type=int, default=8)
    g.add_argument("--boft_block_num", type=int, default=0)
    g.add_argument("--boft_n_butterfly_factor", type=int, default=2)
    g.add_argument("--boft_dropout", type=float, default=0.1, help="multiplicative dropout (BOFT and OFT)")
    g.add_argument("--oft_block_size", type=int, default=16)
    g.add_argument("--oft_use_cayley_neumann", action="store_true")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=8)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--vblora_r", type=int, default=4)
    g.add_argument("--vblora_num_vectors", type=int, default=256)
    g.add_argument("--vblora_vector_length", type=int, default=256)
    g.add_argument("--vblora_topk", type=int, default=2)
    g.add_argument("--vblora_bank_lr", type=float, default=None, help="default: --learning_rate")
    g.add_argument("--vblora_logits_lr", type=float, default=None, help="default: 10 × --learning_rate")
    if defaults:
        parser.set_defaults(**defaults)


def adapter_config_from_args(args: argparse.Namespace, target_modules) -> AdapterConfig:
    if args.adapter == "boft":
        size = 0 if args.boft_block_num else args.boft_block_size
        return BOFTConfig(block_size=size, block_num=args.boft_block_num, dropout=args.boft_dropout,
                          n_butterfly_factor=args.boft_n_butterfly_factor, target_modules=target_modules)
    if args.adapter == "oft":
        return OFTConfig(block_size=args.oft_block_size, use_cayley_neumann=args.oft_use_cayley_neumann,
                         dropout=args.boft_dropout, target_modules=target_modules)
    if args.adapter == "lora":
        return LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          target_modules=target_modules)
    return VBLoRAConfig(r=args.vblora_r, num_vectors=args.vblora_num_vectors, topk=args.vblora_topk,
                        vector_length=args.vblora_vector_length, target_modules=target_modules)


def make_optimizer(model: nn.Module, args: argparse.Namespace, lr: float, weight_decay: float):
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay,
                              vector_bank_lr=args.vblora_bank_lr or lr, logits_lr=args.vblora_logits_lr or 10 * lr)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


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
    with atomic_folder(path) as tmp:
        torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "step": step, "rng": _rng_state()}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    found = [p for p in Path(folder).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_checkpoint(folder: str | Path, resume: str | None) -> Path | None:
    """``latest`` → newest checkpoint in ``folder`` (None when there is none); else the given path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no training_state.pt there; give a "
                                f"checkpoint-<step> folder or 'latest'")
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote into an identically built model; returns state.json.

    Loads tensors and plain data only (``weights_only=True``): a checkpoint holding any other pickled
    object is refused before it can run anything."""
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
    (``resume`` given and a checkpoint there) or ``overwrite`` is set, which deletes everything but
    ``keep`` first. In a multi-process launch every process checks and the main process deletes.
    """
    from accelerate import PartialState

    out = Path(output_dir)
    keep_paths = {Path(k).resolve() for k in keep if k}
    others = [p for p in out.iterdir() if p.resolve() not in keep_paths] if out.is_dir() else []
    resuming = resume is not None and (resume != "latest" or bool(list_checkpoints(out)))
    if others and not resuming and not overwrite:
        names = sorted(p.name for p in others)
        raise FileExistsError(f"output_dir {out} holds another run ({', '.join(names[:5])}{' …' if len(names) > 5 else ''}); "
                              "pass --overwrite_output_dir to replace it, --resume_from_checkpoint latest to "
                              "continue it, or choose another --output_dir")
    state = PartialState()
    if others and overwrite and not resuming and state.is_main_process:
        for p in others:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    state.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_epochs(accelerator, model: nn.Module, optimizer, train_loader, eval_loader, epochs: int,
                   warmup_ratio: float, run_dir: str | Path, resume: str | None) -> SimpleNamespace:
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
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler)
        accelerator.print(f"resumed from {checkpoint} (epoch {state['epoch']})")
    return SimpleNamespace(model=model, optimizer=optimizer, train_loader=train_loader, eval_loader=eval_loader,
                           scheduler=scheduler, steps_per_epoch=steps_per_epoch, total=total, state=state)


def accelerator_from_args(args: argparse.Namespace):
    """The step-based scripts' Accelerator: accumulation, mixed precision, trackers (``--report_to``)
    logging under ``output_dir/logs``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision,
                       log_with=None if args.report_to == "none" else args.report_to,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def train_steps(accelerator, args: argparse.Namespace, trained: nn.Module, models: list, optimizer, scheduler,
                loader, loss_fn, validate=None) -> SimpleNamespace:
    """The optimizer-step loop of the step-based scripts (DreamBooth, control), prepared objects given.

    Resumes from ``--resume_from_checkpoint`` (``latest`` or a folder under ``output_dir``), continuing
    mid-epoch with the batches the interrupted epoch had not seen; then per batch: ``loss_fn(batch)``
    under ``accumulate(*models)``, backward, gradient clipping (``--max_grad_norm``), optimizer and
    scheduler step; per optimizer step: progress bar, tracker log, a checkpoint every
    ``--checkpointing_steps`` and ``validate(step)`` (→ a saved path) every ``--validation_steps``.
    Returns ``step``, ``losses``, ``validations`` and ``seconds``.
    """
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    step, losses = 0, []
    checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trained, optimizer, scheduler)
        step, losses = state["step"], state.get("losses", [])
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    bar = tqdm(range(args.max_train_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    start, validations = time.time(), []
    while step < args.max_train_steps:
        skip = (step % updates_per_epoch) * args.gradient_accumulation_steps  # resumed mid-epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(*models):
                loss = loss_fn(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(accelerator.gather(loss.detach()).mean().item())
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": losses[-1], "lr": lr}, step=step)
            if step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                save_checkpoint(out, trained, optimizer, scheduler, step, {"losses": losses},
                                keep=args.checkpoints_total_limit)
            if validate is not None and step % args.validation_steps == 0 and accelerator.is_main_process:
                validations.append(str(validate(step)))
            if step >= args.max_train_steps:
                break
    accelerator.wait_for_everyone()
    return SimpleNamespace(step=step, losses=losses, validations=validations, seconds=round(time.time() - start, 1))
