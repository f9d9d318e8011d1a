"""The training loops' shared parts: optimizer and schedule, trackers, the step loop of the step-based
scripts (:func:`train_steps`), resumable epochs (:class:`EpochBatches`), and what a run does on a
signal (:class:`StopSignals`) or a non-finite loss."""
from __future__ import annotations

import argparse
import ctypes
import itertools
import math
import os
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..inject import parameter_groups
from ..sharding import is_sharded
from .arguments import check_requirements
from .checkpoints import (
    TrainingDiverged,
    load_checkpoint,
    resolve_checkpoint,
    run_settings,
    save_checkpoint,
)


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


def start_trackers(accelerator, args: argparse.Namespace, project: str) -> None:
    """Trackers of ``--report_to`` (checked before training by :func:`check_requirements`), configured
    with the run's settings (secrets left out)."""
    if args.report_to not in (None, "none") and accelerator.is_main_process:
        accelerator.init_trackers(project, config=run_settings(args))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_BLOCKS_UP_TO = 32 << 20  # the largest mmap threshold glibc takes on a 64-bit system
MALLOC_SETTINGS = ("trim_threshold", "mmap_threshold", "mmap_max", "top_pad")


def keep_freed_memory(device) -> bool:
    """Training on a CPU: have glibc's allocator keep the memory a step frees for the next step.

    glibc gives freed memory at the top of its heap back to the system once it exceeds a threshold (16 MiB
    after a few 8 MiB tensors), so a step that allocates and frees its activations every step faults all of
    their pages in again: on a 2-core x86 CPU 11–15 thousand page faults and 3–8 % of a full-butterfly BOFT
    step over four 1024-wide layers (docs/benchmarks.md). PyTorch's CPU tuning guide gets this reuse from jemalloc or
    tcmalloc; this is the same with glibc, in the process (``mallopt``): no trimming, blocks up to 32 MiB
    from the heap rather than fresh mappings. The process then holds on to its peak memory, as every GPU
    caching allocator does. Returns whether it was set: not for other devices, without glibc, or with
    ``BOFTVISION_KEEP_FREED_MEMORY=0``; thresholds the user set (``MALLOC_TRIM_THRESHOLD_`` and the like, or
    ``GLIBC_TUNABLES``) are left alone."""
    if torch.device(device).type != "cpu" or os.environ.get("BOFTVISION_KEEP_FREED_MEMORY", "1") == "0":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}" in tunables for name in MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl and others have no such tuning)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def tracked_accelerator(args: argparse.Namespace, project: str, **kwargs):
    """An Accelerator logging to ``--report_to`` under ``output_dir/logs``, trackers started."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_requirements(args)
    out = Path(args.output_dir)
    accelerator = Accelerator(log_with=None if args.report_to in (None, "none") else args.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
                              **kwargs)
    deepspeed_clipping(accelerator, args)
    keep_freed_memory(getattr(args, "device", None) or accelerator.device)  # HQSeg places its model itself
    start_trackers(accelerator, args, project)
    return accelerator


def deepspeed_clipping(accelerator, args: argparse.Namespace) -> None:
    """Under DeepSpeed its engine clips the gradients (accelerate's ``clip_grad_norm_`` does nothing there)
    with the config's ``gradient_clipping``: "auto" (a config that leaves it out) gets the script's
    ``--max_grad_norm``, or 0 — no clipping — for a script without one, as transformers' Trainer fills it.
    accelerate would fill 1.0 and clip runs that do not clip elsewhere."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = float(getattr(args, "max_grad_norm", None) or 0.0)


def accelerator_from_args(args: argparse.Namespace, find_unused_parameters: bool = False):
    """The step-based scripts' Accelerator: accumulation, mixed precision, trackers (``--report_to``)
    logging under ``output_dir/logs``; ``find_unused_parameters`` for DDP when some trained parameters may
    get no gradient in a step."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    out = Path(args.output_dir)
    check_requirements(args)
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, kwargs_handlers=[ddp],
                              log_with=None if args.report_to in (None, "none") else args.report_to,
                              project_config=ProjectConfiguration(
                                  project_dir=str(out), logging_dir=str(out / getattr(args, "logging_dir", "logs"))))
    deepspeed_clipping(accelerator, args)
    keep_freed_memory(accelerator.device)
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


def on_any_process(accelerator, *flags: bool) -> list[bool]:
    """Each flag, true where it is true on any process (a collective: every process calls it)."""
    gathered = accelerator.gather(torch.tensor([[float(f) for f in flags]], device=accelerator.device))
    return [bool(f) for f in gathered.amax(dim=0)]


def stop_if_diverged(loss: torch.Tensor, step: int, accelerator=None) -> None:
    """For the epoch-based loops: a non-finite loss stops the run before its step is applied (before the
    backward: DeepSpeed's engine steps inside it). With ``accelerator`` every process calls it and they stop
    together on any one's loss (a collective), instead of the others dying in their next collective with
    the launcher's "connection closed" or, launched without torchrun, waiting there until its timeout."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    elsewhere = accelerator is not None and accelerator.num_processes > 1 and on_any_process(accelerator, bad)[0]
    if bad or elsewhere:
        what = (f"the loss is {loss.detach().float().mean().item()!r}" if bad
                else "another process's loss is not finite")
        raise TrainingDiverged(f"step {step}: {what}; stopping before it is applied. Lower --learning_rate and "
                               "resume with --resume_from_checkpoint latest (the newest checkpoint holds finite "
                               "weights)")


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM (what SLURM and cloud preemption send) and SIGINT
    (Ctrl-C) set ``stop.signal`` instead of killing the process, so the loop can finish its step and
    write a checkpoint. A second Ctrl-C acts as usual; a second SIGTERM is caught too — under torchrun
    (``accelerate launch``) the launcher forwards to its workers the SIGTERM that SLURM already sent to
    every process of the job. A no-op outside the main thread."""

    def __init__(self):
        self.signal: int | None = None
        self._saved = {}

    def _handle(self, signum, frame):
        self.signal = self.signal or signum
        if signum == signal.SIGINT:  # the next Ctrl-C is not caught
            signal.signal(signum, self._saved.get(signum, signal.SIG_DFL))

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


def stop_requested(stop: "StopSignals", accelerator) -> bool:
    """Whether any process got SIGTERM/SIGINT. Processes must stop after the same step (they write its
    checkpoint together, and one that went on would wait for the others in its next collective), and
    signals reach them at different moments: the flag is gathered, one tiny collective per call."""
    if accelerator.num_processes == 1:
        return stop.signal is not None
    flag = torch.tensor([float(stop.signal is not None)], device=accelerator.device)
    return bool(accelerator.gather(flag).amax())


def exit_for_signal(stop: "StopSignals", accelerator, step: int, resume_from: Path | None, progress=None) -> None:
    """The loops of the scripts without :func:`train_steps`, on SIGTERM/SIGINT (:func:`stop_requested`),
    after they wrote a checkpoint at ``step``: say where to resume and exit with status 128 + the signal's
    number (SIGTERM's for a process that stopped for another's signal)."""
    if progress is not None:
        progress.close()
    signum = stop.signal or signal.SIGTERM
    accelerator.print(f"\n{signal.Signals(signum).name}: stopped after step {step}; checkpoint written to "
                      f"{resume_from}. Continue with the same command plus --resume_from_checkpoint latest")
    raise SystemExit(128 + int(signum))


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
    scaler skipping a step with an inf gradient is not counted). Under DeepSpeed, whose engine steps inside
    the backward, the loss decides before it (the gradient norm is DeepSpeed's to clip). SIGTERM or SIGINT
    finish the current step, write a checkpoint and exit with status 128 + the signal's number.
    """
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm

    if validate is not None and is_sharded(trained):  # process 0 alone cannot run a sharded model's forward
        raise ValueError("validation images during a sharded (FSDP, DeepSpeed ZeRO-3) run are not supported: leave "
                         "out --validation_prompt / --validation_image and draw from the saved adapter afterwards "
                         "(python -m boftvision.generate --adapter_path OUTPUT_DIR --prompt …)")
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
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    bar = tqdm(range(args.max_train_steps), initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    start, validations, nonfinite = time.time(), [], 0

    def checkpoint_now():
        # every process: a sharded model is gathered (collective); process 0 writes
        save_checkpoint(out, trained, optimizer, scheduler, step, {"losses": losses, "settings": settings},
                        keep=args.checkpoints_total_limit)

    with StopSignals() as stop:
        while step < args.max_train_steps:
            skip = (step % updates_per_epoch) * args.gradient_accumulation_steps  # resumed mid-epoch
            for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
                with accelerator.accumulate(*models):
                    loss, norm = loss_fn(batch), None
                    bad_loss = not bool(torch.isfinite(loss.detach()).all())
                    if deepspeed:  # its engine clips and steps inside backward: decided on the loss, before
                        bad, stopping = on_any_process(accelerator, bad_loss, stop.signal is not None)
                        if not bad:
                            accelerator.backward(loss)
                    else:
                        accelerator.backward(loss)
                        norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm or float("inf")) \
                            if accelerator.sync_gradients else None  # (0: the norm is only measured)
                        bad_norm = norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)))
                        scaler_skips = accelerator.scaler is not None and bad_norm and not bad_loss
                        bad, stopping = on_any_process(accelerator, bad_loss or (bad_norm and not scaler_skips),
                                                       stop.signal is not None)
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
