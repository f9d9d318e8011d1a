"""Per-process memory of a 2-process FSDP2 run and a DeepSpeed ZeRO-3 run against DDP: a ~100M-parameter
Llama with BOFT (m=2, b=8 on q/v projections), gloo on CPU, two training steps.

    python benchmarks/bench_sharding.py [--layers 12 --hidden 768] [--modes ddp fsdp2 zero3]

Prints, per process: the parameter bytes it holds (its shards under FSDP2, its partitions under ZeRO-3),
its resident memory after the steps (VmRSS, after freed heap memory is returned to the OS) and its peak
(VmHWM). Under DDP and FSDP2 every process builds the whole model before wrapping, so the peak includes
one full copy; ZeRO-3 builds it partitioned (``deepspeed.zero.Init``, as transformers' ``from_pretrained``
does under accelerate's ZeRO-3) and never holds it whole.
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
        t = p._local_tensor if isinstance(p, DTensor) else getattr(p, "ds_tensor", p)
        total += t.numel() * t.element_size()
    return total


def worker(rank: int, kind: str, port: int, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    width = int(args.hidden * 8 / 3) // 64 * 64
    config = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=width,
                         num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12)
    zero3 = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
             "zero_allow_untested_optimizer": True}
    if kind == "zero3":
        import importlib

        import deepspeed

        importlib.import_module("torch._dynamo")  # not importable inside zero.Init (it patches Tensor.__new__)

        with deepspeed.zero.Init(config_dict_or_path=zero3):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    bv.add_adapter(model, bv.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=["q_proj", "v_proj"]))
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if kind == "zero3":  # its engine runs backward and step
        model, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3)
    gc.collect()
    ids = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        if kind == "zero3":
            model.backward(loss)
            model.step()
        else:
            loss.backward()
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
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp2", "zero3"], choices=["ddp", "fsdp2", "zero3"])
    args = p.parse_args()
    print("| mode | process | model | parameters held (MiB) | resident after (MiB) | peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for kind in args.modes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(worker, args=(kind, port, args), nprocs=2)


if __name__ == "__main__":
    main()
