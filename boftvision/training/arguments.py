"""The flags the training scripts share: the adapter's (generated from the registry and the configs),
diffusers' example-script flags, trackers, and the checks that stop a run before training when a flag
needs something absent."""
from __future__ import annotations

import argparse
import dataclasses
import math
import warnings

from ..adapters import METHODS
from ..config import ORIENTATIONS, AdapterConfig

# help of the flags many scripts share (diffusers' and transformers' names); a script's own flags carry
# their help where they are defined
FLAG_HELP = {
    "overwrite_output_dir": "replace a finished or different run in --output_dir (refused otherwise)",
    "skip_bad_files": "drop unreadable images with a warning (default: stop before training, listing them)",
    "max_nonfinite_steps": "consecutive steps with a NaN/inf loss or gradient tolerated (never applied) before "
                           "the run stops as diverged",
    "peft_compatible": "save BOFT with m ≥ 2 as the equal one-factor BOFT that stock PEFT loads everywhere",
    "export_format": "also write output_dir/adapter_lycoris.safetensors, the LyCORIS/kohya file ComfyUI, "
                     "AUTOMATIC1111 and kohya load (OFT/BOFT: with --orientation output)",
    "save_single_file": "also write output_dir/model.safetensors: the merged pipeline as one original-layout "
                        "Stable Diffusion checkpoint (AUTOMATIC1111, ComfyUI; any adapter)",
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
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
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


def _renamed(base: type[argparse.Action]) -> type[argparse.Action]:
    class Renamed(base):
        """A flag whose first spelling is current; the others still work, with a FutureWarning."""

        def __call__(self, parser, namespace, values, option_string=None):
            if option_string and option_string != self.option_strings[0]:
                warnings.warn(f"{option_string} is deprecated; use {self.option_strings[0]}", FutureWarning,
                              stacklevel=2)
            super().__call__(parser, namespace, values, option_string)

    return Renamed


# action= for a flag given with its current name first and older spellings after it, e.g.
# add_argument("--num_inference_steps", "--steps", action=RENAMED, dest="steps", ...)
RENAMED = _renamed(argparse._StoreAction)
RENAMED_APPEND = _renamed(argparse._AppendAction)


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
    g.add_argument("--orientation", choices=list(ORIENTATIONS), default="input",
                   help="oft/boft: the side of W0 the rotation acts on — input (the papers, PEFT) or output "
                        "(LyCORIS: what --export_format lycoris writes for ComfyUI/AUTOMATIC1111/kohya) "
                        "(default: %(default)s)")
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
    orientation = getattr(args, "orientation", "input")
    if "orientation" in {f.name for f in dataclasses.fields(method.config)}:
        values["orientation"] = orientation
    elif orientation != "input":
        raise ValueError(f"--orientation {orientation} applies to --adapter oft/boft, not {args.adapter}")
    return method.config(target_modules=target_modules, base_model_name_or_path=base_model_name_or_path,
                         revision=getattr(args, "revision", None), **values)


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
    orientation, adapter = getattr(args, "orientation", "input"), getattr(args, "adapter", None)
    if getattr(args, "export_format", "peft") == "lycoris":
        if adapter in ("oft", "boft") and orientation != "output":
            raise SystemExit(f"--export_format lycoris with --adapter {adapter} needs --orientation output (LyCORIS "
                             "files rotate the output side); or keep the input side and use --save_single_file")
        if adapter == "oft" and getattr(args, "oft_use_cayley_neumann", False):
            raise SystemExit("--export_format lycoris with --adapter oft needs the exact Cayley transform: drop "
                             "--oft_use_cayley_neumann")
    if getattr(args, "peft_compatible", False) and orientation == "output":
        raise SystemExit("--peft_compatible: PEFT's format holds the input orientation only; drop --orientation "
                         "output, or use --export_format lycoris")
    if getattr(args, "push_to_hub", False):
        from huggingface_hub import get_token

        if not (args.hub_token or get_token()):
            raise SystemExit("--push_to_hub needs a hub token: huggingface-cli login, or --hub_token")


LYCORIS_FILE = "adapter_lycoris.safetensors"  # --export_format lycoris
SINGLE_FILE = "model.safetensors"  # --save_single_file


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The diffusion scripts' export flags beyond the PEFT adapter folder: a LyCORIS file and a merged
    single-file checkpoint (what ComfyUI, AUTOMATIC1111 and kohya load)."""
    p.add_argument("--export_format", choices=["peft", "lycoris"], default="peft",
                   help=FLAG_HELP["export_format"] + " (default: %(default)s: the PEFT folder only)")
    p.add_argument("--save_single_file", action="store_true", help=FLAG_HELP["save_single_file"])


def add_report_to_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report_to", default="none",
                   help="tracker for the loss and metrics: tensorboard, wandb, all or none (default: %(default)s)")


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


# what a user's input can cause (a bad path, flag, file or folder): shown as one line, without a traceback
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError, KeyError)


def run_cli(main, argv=None) -> None:
    """Run a script's ``main``: errors caused by its input print as one ``error: …`` line (exit 2, as
    argparse does) instead of a traceback; anything else — a bug — keeps its traceback."""
    import sys

    try:
        main() if argv is None else main(argv)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None

