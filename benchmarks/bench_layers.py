"""Training-step cost of a stack of Linear layers: frozen base vs ours vs PEFT and LyCORIS, as ratios.

One step = forward + backward (+ AdamW step on the adapter parameters). The input requires grad, so
the frozen base also back-propagates through every layer (what a frozen layer costs inside a network).
Also: a merged model's forward against the base's (must cost the same), and the time to merge.
Every row's step runs once per round, rounds repeated ``--iters`` times, and each row reports its
fastest step: the machine's drifts reach all rows alike, and ratios are within one run. Rows in one
process share the allocator's heap and the caches, which moves their ratios (on a 2-core x86 CPU the
full butterfly's by up to 0.15); ``--isolate`` times each row in a process of its own, interleaved with
the frozen base there — what one model training alone sees. ``--keep-freed-memory`` sets glibc up the
way the training scripts do on CPU (freed memory kept for the next step, no page faults re-taken).

    python benchmarks/bench_layers.py                          # CPU, small sizes
    python benchmarks/bench_layers.py --widths 1024 --no-peft --isolate
    python benchmarks/bench_layers.py --widths 1024 --no-peft --isolate --keep-freed-memory
    python benchmarks/bench_layers.py --device cuda --dtype bf16 --widths 1024 4096 --tokens 8192

PEFT's BOFT silently runs with one butterfly factor when its CUDA extension does not build (always on
CPU): the row "PEFT BOFT (as run)" is what users get; "PEFT BOFT true m" patches the extension check
the way tests/peft_reference.py does (a torch block-diagonal stands in for the CUDA kernel).
"""
from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import boftvision as bv
from boftvision.adapters import OrthogonalAdapter, orthogonal
from boftvision.inject import find_targets
from boftvision.training import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stack(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def peft_configs():
    import peft

    return {
        "LoRA r=16": lambda t, w: peft.LoraConfig(r=16, lora_alpha=16, target_modules=t),
        "OFT b=16": lambda t, w: peft.OFTConfig(oft_block_size=16, r=0, target_modules=t),
        "BOFT m=2 b=8": lambda t, w: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=t),
        "VB-LoRA": lambda t, w: peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=min(256, w),
                                                  target_modules=t),
    }


OUR_CONFIGS = {
    "LoRA r=16": lambda t, w: bv.LoRAConfig(r=16, alpha=16, target_modules=t),
    "OFT b=16": lambda t, w: bv.OFTConfig(block_size=16, target_modules=t),
    "BOFT m=2 b=8": lambda t, w: bv.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=t),
    "BOFT m=2 b=8 output side": lambda t, w: bv.BOFTConfig(block_size=8, n_butterfly_factor=2, orientation="output",
                                                           target_modules=t),
    "BOFT full b=8": lambda t, w: bv.BOFTConfig(block_size=8, n_butterfly_factor=0, target_modules=t),
    "VB-LoRA": lambda t, w: bv.VBLoRAConfig(r=4, num_vectors=256, vector_length=min(256, w), target_modules=t),
}


class WithLycoris(nn.Module):
    """``model`` with lycoris-lora's BOFT (full butterfly, b = 8: its only structure; weight or bypass mode)
    on each of ``layers``; LyCORIS picks its own kernels (fused Triton on recent GPUs, eager on CPU)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], bypass: bool):
        from lycoris.modules.boft import ButterflyOFTModule

        super().__init__()
        self.model = model
        self.lycoris = nn.ModuleList(ButterflyOFTModule(name.replace(".", "_"), layer, 1.0, lora_dim=8,
                                                        bypass_mode=bypass) for name, layer in layers.items())
        for module in self.lycoris:
            module.apply_to()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def with_lycoris(base: nn.Module, targets, bypass: bool) -> WithLycoris:
    """A copy of ``base`` with lycoris-lora's BOFT on the layers our adapters would target."""
    model = copy.deepcopy(base)
    return WithLycoris(model, dict(find_targets(model, bv.LoRAConfig(target_modules=targets))), bypass)


def make_step(model, x, train=True):
    """One training step (forward, backward, AdamW on the trainable parameters) or one inference forward."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4) if params and train else None

    def step():
        if not train:
            with torch.no_grad():
                return model(x)
        model(x.detach().requires_grad_(True)).float().square().mean().backward()
        if optim:
            optim.step()
            optim.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict, device: str, iters: int, warmup: int) -> dict:
    """Minimum step time (ms) of each entry over ``iters`` rounds, one step of every entry per round, so
    the machine's slow drifts (other load, clocks, heat) reach every row alike; on CUDA, the memory a step
    allocates above what was resident before it (GiB; NaN elsewhere); and the process's minor page faults
    per step: memory the allocator gave back to the OS and the step touches afresh (on CPU, glibc returns
    freed memory above a threshold at every step, so a step that holds more pays the faults each time)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {label: [] for label in steps}
    peaks = dict.fromkeys(steps, float("nan"))
    faults = dict.fromkeys(steps, 0)
    for _ in range(iters):
        for label, step in steps.items():
            if device == "cuda":
                sync()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            faulted, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            step()
            sync()
            times[label].append(time.perf_counter() - start)
            faults[label] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
            if device == "cuda":
                peaks[label] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    return {label: (min(t) * 1000, peaks[label], faults[label] / iters) for label, t in times.items()}


def saved_mib(model, x) -> float:
    """MiB of the tensors one training forward keeps for the backward (distinct storages): what a step
    holds beyond the weights at its peak, on any device (CUDA's allocator peak is the other column)."""
    storages = {}

    def keep(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    # OFT/BOFT keep their rotation's small graph behind their own (identity) hooks: count it too
    identity, orthogonal.keep = orthogonal.keep, keep
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(x.detach().requires_grad_(True)).float().square().mean()
    finally:
        orthogonal.keep = identity
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's rows")
    parser.add_argument("--rows", nargs="+", help="only the rows whose label contains one of these (and the frozen "
                        "base), e.g. --rows 'BOFT full' LyCORIS")
    parser.add_argument("--profile", metavar="LABEL",
                        help="after the table, torch.profiler's per-operator table of 3 steps of the row with this "
                             "label (e.g. 'ours BOFT full b=8'): where a step's time goes")
    parser.add_argument("--side", default="auto", choices=["auto", "input", "weight"],
                        help="pin the rotation side of our OFT/BOFT (default: chosen per layer by cost)")
    parser.add_argument("--isolate", action="store_true",
                        help="time each row in its own process with the frozen base (no inference rows)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="on CPU, have glibc keep freed memory for the next step, as the training scripts do "
                             "(boftvision.training.keep_freed_memory); default: glibc as it comes")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # --isolate's child: exactly this row and the frozen base
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], args.device
    OrthogonalAdapter.rotation_side = args.side
    kept = args.keep_freed_memory and keep_freed_memory(device)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    print(f"device={device} dtype={args.dtype} tokens={args.tokens} layers={args.layers} torch={torch.__version__} "
          f"rotation side={args.side} freed memory={'kept' if kept else 'as the allocator does'}")
    print("| width | model | step ms | × frozen | saved for backward MiB | CUDA step GiB | page faults / step |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        targets = [str(i) for i in range(args.layers)]
        base = stack(width, args.layers).to(device, dtype).requires_grad_(False)
        x = torch.randn(args.tokens, width, device=device, dtype=dtype)
        candidates = [("frozen base", lambda: base)]
        candidates += [(f"ours {k}", lambda k=k: bv.add_adapter(copy.deepcopy(base), OUR_CONFIGS[k](targets, width)))
                       for k in OUR_CONFIGS]
        try:
            import lycoris  # noqa: F401
        except ImportError:
            pass
        else:
            for mode, bypass in (("weight mode", False), ("bypass mode", True)):
                candidates.append((f"LyCORIS BOFT full b=8 ({mode})",
                                   lambda bypass=bypass: with_lycoris(base, targets, bypass)))
        if not args.no_peft:
            import peft
            from peft_reference import peft_model

            for k, make in peft_configs().items():
                cfg = make(targets, width)
                as_run = (f"PEFT {k} (as run)" if k.startswith("BOFT") else f"PEFT {k}",
                          lambda cfg=cfg: peft.get_peft_model(copy.deepcopy(base), cfg))
                candidates.append(as_run)
                if k.startswith("BOFT"):
                    candidates.append((f"PEFT {k} true m", lambda cfg=cfg: peft_model(base, cfg)))
        candidates = [(label, build) for label, build in candidates if label == "frozen base" or (
            label == args.only if args.only else not args.rows or any(r in label for r in args.rows))]
        if args.isolate:
            isolated(args, width, [label for label, _ in candidates])
            continue
        models = {label: build().to(device) for label, build in candidates}
        steps = {label: make_step(model, x) for label, model in models.items()}
        if not args.only:  # a merged adapter's inference costs the base's
            merged = bv.add_adapter(copy.deepcopy(base), OUR_CONFIGS["BOFT m=2 b=8"](targets, width))
            start = time.perf_counter()
            bv.merge_adapter(merged)
            merge_ms = (time.perf_counter() - start) * 1000
            steps["base forward (inference)"] = make_step(base, x, train=False)
            steps[f"ours BOFT merged forward (merge took {merge_ms:.1f} ms)"] = make_step(merged, x, train=False)
        timed = time_interleaved(steps, device, args.iters, args.warmup)
        frozen = timed["frozen base"][0]
        for label, (ms, peak, faults) in timed.items():
            saved = saved_mib(models[label], x) if label in models else float("nan")
            print(f"| {width} | {label} | {ms:.2f} | {ms / frozen:.2f} | {saved:.0f} | {peak:.2f} | {faults:.0f} |")
        if args.profile in steps:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(3):
                    steps[args.profile]()
            print(f"\n{args.profile}, width {width}, 3 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def isolated(args, width: int, labels: list[str]) -> None:
    """``--isolate``: each row's step timed in a child process of its own together with the frozen base
    (interleaved there); its ratio is to that process's frozen base, whose time is the first row."""
    forwarded = ["--device", args.device, "--dtype", args.dtype, "--widths", str(width), "--tokens", str(args.tokens),
                 "--layers", str(args.layers), "--iters", str(args.iters), "--warmup", str(args.warmup),
                 "--side", args.side] + ["--keep-freed-memory"] * args.keep_freed_memory
    for i, label in enumerate(label for label in labels if label != "frozen base"):
        run = subprocess.run([sys.executable, __file__, *forwarded, "--only", label], capture_output=True, text=True,
                             check=True)
        for line in run.stdout.splitlines():
            if line.startswith(f"| {width} | {label} |") or (i == 0 and line.startswith(f"| {width} | frozen base |")):
                print(line, flush=True)


if __name__ == "__main__":
    main()
