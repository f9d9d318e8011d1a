"""Checkpoints that resume and never run code, output folders that never mix two runs.

Checkpoints hold only what training changes (trainable parameters, optimizer, scheduler, step, RNG),
never the frozen base, and only tensors and plain data: they load with ``torch.load(weights_only=True)``,
so a planted checkpoint cannot run code. They are written whole (a temporary sibling, then a rename)."""
from __future__ import annotations

import argparse
import enum
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import types
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters import METHODS
from ..files import atomic_folder
from ..sharding import barrier, clean_name, deepspeed_optimizer, full_tensor, is_sharded, is_zero3, rank, unwrap


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops before the optimizer applies it."""


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
    deepspeed = deepspeed_optimizer(optimizer) is not None
    sharded = deepspeed or is_sharded(model)
    if deepspeed:  # every process calls this: its optimizer partition goes to process 0, which writes
        trainable, optimizer_state, rng = deepspeed_training_state(model, optimizer)
    elif sharded:  # every process calls this: the full tensors are gathered, process 0 writes
        trainable, optimizer_state, rng = sharded_training_state(model, optimizer)
    else:
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        optimizer_state, rng = optimizer.state_dict(), _rng_state()
    bad = next((n for n, t in trainable.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad:
        raise TrainingDiverged(f"step {step}: parameter {bad} is not finite; not writing checkpoint-{step} (the "
                               "newest complete checkpoint stays the latest); lower --learning_rate and resume")
    if rank() != 0:
        if sharded:
            barrier()
        return path
    try:
        with atomic_folder(path) as tmp:
            torch.save({"trainable": trainable, "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "step": step, "rng": rng, "sharded": sharded, "deepspeed": deepspeed},
                       tmp / "training_state.pt")
            (tmp / "state.json").write_text(json.dumps({**(extra or {}), "step": step}, indent=2))
    finally:
        if sharded:
            barrier()
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            remove_folder(old)
    for leftover in Path(folder).glob(".checkpoint-*"):  # what a kill left of earlier writes or removals
        shutil.rmtree(leftover, ignore_errors=True)
    return path


def sharded_training_state(model: nn.Module, optimizer) -> tuple[dict, dict, list]:
    """A sharded (FSDP1/FSDP2) model's trainable parameters and optimizer state as whole tensors keyed by
    parameter name (torch's distributed state-dict API; collective), and every process's RNG state."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    names = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
    # cpu_offload copies each gathered tensor off the accelerator; on a CPU, FSDP1's Adam moments then
    # alias one gather buffer (exp_avg came back holding exp_avg_sq's values): gather without it there
    offload = any(p.device.type != "cpu" for p in model.parameters())
    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_state())
    return {n: t for n, t in model_state.items() if n in names}, optimizer_state, rngs


def load_sharded_training_state(model: nn.Module, optimizer, state: dict, path: Path, say=print) -> None:
    """Inverse of :func:`sharded_training_state`. The tensors are whole and keyed by name, so the model may
    be sharded another way, by another number of processes, or not at all: every process reads the whole
    file and keeps its shards. Each process gets its own RNG state back (see :func:`process_rng`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    check_parameters(state, {clean_name(n): p for n, p in unwrap(model).named_parameters()}, path)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    set_state_dict(model, optimizer, model_state_dict=state["trainable"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    _set_rng_state(process_rng(state["rng"], path, say))


def process_rng(saved: list[dict], path: Path, say=print) -> dict:
    """This process's RNG state from a checkpoint that holds one per writing process: its own when the
    process counts match, else that of process (rank mod writers), said once (process 0)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world != len(saved) and rank() == 0:
        say(f"checkpoint {path} was written by {len(saved)} process(es) and this run has {world}: the adapter, "
            f"optimizer and schedule resume exactly; random numbers (dropout, shuffling) go on from the writers' "
            f"states (process i takes process i mod {len(saved)}'s), so the steps from here are not the ones "
            f"{len(saved)} process(es) would have taken")
    return saved[rank() % len(saved)]


KEPT = "<taken from the running optimizer>"


def plain_data(value):
    """``value`` as tensors and plain data (what ``weights_only`` loading accepts): an object becomes its
    attributes; what has no such form (an enum) is marked :data:`KEPT`, to be taken from the running
    optimizer by :func:`restore_data`."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, enum.Enum):
        return KEPT
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # (a named tuple becomes a tuple)
        return [plain_data(v) for v in value] if isinstance(value, list) else tuple(plain_data(v) for v in value)
    if hasattr(value, "__dict__"):
        return {"__attributes__": plain_data(vars(value))}
    return KEPT


def restore_data(saved, running):
    """Inverse of :func:`plain_data` on the running optimizer's own state (``running``): objects get their
    saved attributes back (objects the running state lacks come back as namespaces), what was
    :data:`KEPT` is the running one's."""
    if isinstance(saved, str) and saved == KEPT:
        return running
    if isinstance(saved, dict) and set(saved) == {"__attributes__"}:
        if running is None:  # another process's object (its own parameters' places): attributes suffice
            return types.SimpleNamespace(**restore_data(saved["__attributes__"], None))
        for key, value in saved["__attributes__"].items():
            setattr(running, key, restore_data(value, getattr(running, key, None)))
        return running
    if isinstance(saved, dict):
        running = running if isinstance(running, dict) else {}
        return {k: restore_data(v, running.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        running = running if isinstance(running, (list, tuple)) and len(running) == len(saved) else [None] * len(saved)
        return type(saved)(restore_data(v, r) for v, r in zip(saved, running))
    return saved


def deepspeed_training_state(model: nn.Module, optimizer) -> tuple[dict, dict, list]:
    """A DeepSpeed run's trainable parameters as whole tensors (ZeRO-3's partitions gathered), every
    process's part of the ZeRO optimizer's state (its partition of the fp32 weights and of the moments, in
    plain data) and every process's RNG state; collective, the parts land on process 0."""
    import torch.distributed as dist

    trainable = {clean_name(n): full_tensor(p) for n, p in unwrap(model).named_parameters() if p.requires_grad}
    parts = [None] * dist.get_world_size() if rank() == 0 else None
    dist.gather_object(plain_data(deepspeed_optimizer(optimizer).state_dict()), parts, dst=0)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_state())
    return trainable, {"deepspeed_parts": parts}, rngs


def load_deepspeed_training_state(model: nn.Module, optimizer, state: dict, path: Path) -> None:
    """Inverse of :func:`deepspeed_training_state` in a run with as many processes: the parameters (ZeRO-3:
    into the partitions), each process's optimizer partition, its RNG state."""
    import torch.distributed as dist

    parts = state["optimizer"]["deepspeed_parts"]
    if len(parts) != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was written by {len(parts)} DeepSpeed processes and this run has "
                         f"{dist.get_world_size()}: ZeRO splits the optimizer's state by process, resume with "
                         f"{len(parts)} (--num_processes {len(parts)})")
    params = {clean_name(n): p for n, p in unwrap(model).named_parameters()}
    check_parameters(state, params, path)
    import deepspeed

    with torch.no_grad():
        for name, value in state["trainable"].items():  # (ZeRO-3: process 0's copy goes into the partitions)
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0, enabled=is_zero3(params[name])):
                params[name].copy_(value)
    zero = deepspeed_optimizer(optimizer)
    running = zero.state_dict()
    zero.load_state_dict(state_dict_list=[restore_data(part, running) for part in parts],
                         load_optimizer_states=True, load_from_fp32_weights=True)
    _set_rng_state(state["rng"][rank()])


def remove_folder(path: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a hidden folder, never a checkpoint-N
    with some of its files gone."""
    trash = path.with_name(f".{path.name}.deleted-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
        if rank() == 0:  # every process resolves; one says so
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


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, scheduler, settings: dict | None = None,
                    say=print) -> dict:
    """Restore what :func:`save_checkpoint` wrote into an identically built model; returns state.json.

    Loads tensors and plain data only (``weights_only=True``): a checkpoint holding any other pickled
    object is refused before it can run anything. With ``settings`` (:func:`run_settings`), a checkpoint
    of a run with other settings is refused first (see :func:`check_resume_settings`)."""
    path = Path(path)
    if settings is not None:
        saved = json.loads((path / "state.json").read_text()).get("settings")
        check_resume_settings(saved, settings, path, say)
    try:
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"checkpoint {path} holds pickled objects other than tensors and plain data, which could "
                         "run code when loaded; refusing it. Checkpoints written by boftvision hold only tensors: "
                         "delete this one (or resume from another) if you did not make it yourself") from err
    written_by_deepspeed, under_deepspeed = bool(state.get("deepspeed")), deepspeed_optimizer(optimizer) is not None
    if written_by_deepspeed != under_deepspeed:
        written, now = ("a DeepSpeed", "without DeepSpeed") if written_by_deepspeed else ("a non-DeepSpeed",
                                                                                          "under DeepSpeed")
        raise ValueError(f"checkpoint {path} was written by {written} run and this run is {now}: resume it the "
                         "way it was written (the same accelerate config and number of processes)")
    if under_deepspeed:
        load_deepspeed_training_state(model, optimizer, state, path)
    elif state.get("sharded"):  # whole tensors by name: any FSDP layout, any process count, or none
        load_sharded_training_state(model, optimizer, state, path, say)
    elif is_sharded(model):  # a one-process checkpoint into a sharded run: the same, the optimizer's state by name
        state = {**state, "optimizer": optimizer_state_by_name(state["optimizer"], optimizer, model, path),
                 "rng": [state["rng"]]}
        load_sharded_training_state(model, optimizer, state, path, say)
    else:
        params = dict(model.named_parameters())
        check_parameters(state, params, path)
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return json.loads((path / "state.json").read_text())


def optimizer_state_by_name(saved: dict, optimizer, model: nn.Module, path: Path) -> dict:
    """A torch optimizer's ``state_dict()`` (parameters by position) keyed by parameter name, as torch's
    distributed state-dict API takes it; the positions are read from the running optimizer, built the same
    way as the one that wrote it (as ``optimizer.load_state_dict`` assumes too)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): clean_name(n) for n, p in unwrap(model).named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if sorted(i for g in saved["param_groups"] for i in g["params"]) != list(range(len(order))):
        raise ValueError(f"checkpoint {path}: its optimizer held other parameters than this run's ({len(order)}); "
                         "was it made with other adapter settings?")
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in saved["param_groups"]]
    return {"state": {order[i]: value for i, value in saved["state"].items()}, "param_groups": groups}


def check_parameters(state: dict, params: dict, path) -> None:
    """Refuse a checkpoint holding trainable parameters the model lacks (other adapter settings)."""
    missing = [n for n in state["trainable"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} holds parameters this model lacks: {missing[:3]}; was it made "
                         "with other adapter settings?")


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
    from accelerate.utils import parse_flag_from_env

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
    # the first state of the run decides the backend: honour ACCELERATE_USE_CPU as the Accelerator made
    # next would (a bare PartialState() takes a multi-process CPU launch for unrelated single processes)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
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
