"""Per-process memory of a 2-process FSDP2 run against DDP: a ~100M-parameter Llama with BOFT
(m=2, b=8 on q/v projections), gloo on CPU, two training steps.

    python benchmarks/bench_sharding.py [--layers 12 --hidden 768]

Prints, per process: the parameter bytes it holds (its shards under FSDP2), its resident memory after
the steps (VmRSS, after freed heap memory is returned to the OS) and its peak (VmHWM). Every process
builds the whole model before wrapping, so the peak includes one full copy in both modes; what
sharding saves shows in the held parameters and the memory resident afterwards.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket

import torch
import torch.distributed as dist

import boftvision as bv


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so resident memory shows what is held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def held_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        t = p._local_tensor if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def worker(rank: int, kind: str, port: int, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    width = int(args.hidden * 8 / 3) // 64 * 64
    config = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=width,
                         num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    bv.add_adapter(model, bv.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=["q_proj", "v_proj"]))
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    gc.collect()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    release_free_memory()
    row = (f"| {kind} | {rank} | {n_params / 1e6:.0f} M | {held_bytes(model) / 2**20:.0f} | "
           f"{status_kib('VmRSS') / 1024:.0f} | {status_kib('VmHWM') / 1024:.0f} |")
    rows = [None, None]
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("\n".join(rows), flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    args = p.parse_args()
    print("| mode | process | model | parameters held (MiB) | resident after (MiB) | peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for kind in ("ddp", "fsdp2"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(worker, args=(kind, port, args), nprocs=2)


if __name__ == "__main__":
    main()
