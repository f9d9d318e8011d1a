"""Training-step cost of a stack of Linear layers: frozen base vs ours vs PEFT and LyCORIS, as ratios.

One step = forward + backward (+ AdamW step on the adapter parameters). The input requires grad, so
the frozen base also back-propagates through every layer (what a frozen layer costs inside a network).
Also: a merged model's forward against the base's (must be equal), and the time to merge.

    python benchmarks/bench_layers.py                          # CPU, small sizes
    python benchmarks/bench_layers.py --device cuda --dtype bf16 --widths 1024 4096 --tokens 8192

PEFT's BOFT silently runs with one butterfly factor when its CUDA extension does not build (always on
CPU): the row "PEFT BOFT (as run)" is what users get; "PEFT BOFT true m" patches the extension check
the way tests/peft_reference.py does (a torch block-diagonal stands in for the CUDA kernel).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import boftvision as bv

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


class LycorisStack(nn.Module):
    """The stack with lycoris-lora's BOFT (full butterfly, b = 8: its only structure) on every layer."""

    def __init__(self, base: nn.Sequential, bypass: bool):
        from lycoris.modules.boft import ButterflyOFTModule

        super().__init__()
        self.net = base
        self.lycoris = nn.ModuleList(ButterflyOFTModule(f"l{i}", layer, 1.0, lora_dim=8, bypass_mode=bypass)
                                     for i, layer in enumerate(base))
        for module in self.lycoris:
            module.apply_to()

    def forward(self, x):
        return self.net(x)


def time_step(model, x, device, iters, warmup, train=True):
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4) if params and train else None
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        start = time.perf_counter()
        if train:
            xi = x.detach().requires_grad_(True)
            model(xi).float().square().mean().backward()
            if optim:
                optim.step()
                optim.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times) * 1000, peak


def saved_mib(model, x) -> float:
    """MiB of the tensors one training forward keeps for the backward (distinct storages): what a step
    holds beyond the weights at its peak, on any device (CUDA's allocator peak is the other column)."""
    storages = {}

    def keep(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(x.detach().requires_grad_(True)).float().square().mean()
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
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], args.device
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    print(f"device={device} dtype={args.dtype} tokens={args.tokens} layers={args.layers} torch={torch.__version__}")
    print("| width | model | step ms | × frozen | saved for backward MiB | CUDA peak GiB |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        targets = [str(i) for i in range(args.layers)]
        base = stack(width, args.layers).to(device, dtype).requires_grad_(False)
        x = torch.randn(args.tokens, width, device=device, dtype=dtype)
        frozen, peak = time_step(base, x, device, args.iters, args.warmup)
        rows = [("frozen base", frozen, saved_mib(base, x), peak)]
        candidates = [(f"ours {k}", lambda k=k: bv.add_adapter(copy.deepcopy(base), OUR_CONFIGS[k](targets, width)))
                      for k in OUR_CONFIGS]
        try:
            import lycoris  # noqa: F401
        except ImportError:
            pass
        else:
            for mode, bypass in (("weight mode", False), ("bypass mode", True)):
                candidates.append((f"LyCORIS BOFT full b=8 ({mode})",
                                   lambda bypass=bypass: LycorisStack(copy.deepcopy(base), bypass)))
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
        for label, build in candidates:
            model = build().to(device)
            ms, peak = time_step(model, x, device, args.iters, args.warmup)
            rows.append((label, ms, saved_mib(model, x), peak))
            del model
        # merged inference equals base inference
        merged = bv.add_adapter(copy.deepcopy(base), OUR_CONFIGS["BOFT m=2 b=8"](targets, width))
        start = time.perf_counter()
        bv.merge_adapter(merged)
        merge_ms = (time.perf_counter() - start) * 1000
        base_inf, _ = time_step(base, x, device, args.iters, args.warmup, train=False)
        merged_inf, _ = time_step(merged, x, device, args.iters, args.warmup, train=False)
        nan = float("nan")
        rows.append(("base forward (inference)", base_inf, nan, nan))
        rows.append((f"ours BOFT merged forward (merge took {merge_ms:.1f} ms)", merged_inf, nan, nan))
        for label, ms, saved, peak in rows:
            print(f"| {width} | {label} | {ms:.2f} | {ms / frozen:.2f} | {saved:.0f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
