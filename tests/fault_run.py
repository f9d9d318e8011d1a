"""A tiny step-based training run through the scripts' shared loop (``training.train_steps``), for the
fault tests: a stack of Linear layers with a BOFT adapter on a fixed regression task, a checkpoint
every ``--checkpointing_steps``, the adapter saved at the end. ``--step_seconds`` slows each step so a
test can signal or kill it mid-run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import boftvision as bv
from boftvision.training import (
    adapter_config_from_args,
    add_adapter_arguments,
    claim_output_dir,
    deepspeed_clipping,
    make_optimizer,
    train_steps,
)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--resume_from_checkpoint")
    p.add_argument("--max_train_steps", type=int, default=12)
    p.add_argument("--checkpointing_steps", type=int, default=1)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--validation_steps", type=int, default=1000)
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_nonfinite_steps", type=int, default=0)
    p.add_argument("--step_seconds", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--started_file", help="touched at the first step (tests wait for it before signalling)")
    p.add_argument("--nan_at_call", type=int, help="process 0's loss is NaN at this call of the loss (1 = first)")
    add_adapter_arguments(p, defaults={"boft_block_size": 4, "boft_dropout": 0.1})
    args = p.parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    accelerator = Accelerator(cpu=True)  # (under tests/accelerate_sharded_cpu.py: DeepSpeed on CPU processes)
    deepspeed_clipping(accelerator, args)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    bv.add_adapter(model, adapter_config_from_args(args, ["0", "2"]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    data = TensorDataset(x, torch.tanh(x @ torch.randn(16, 16, generator=g)))
    loader = DataLoader(data, batch_size=8, shuffle=False)  # file order: a resumed run sees the same batches
    optimizer = make_optimizer(model, args, args.learning_rate, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    calls = []

    def loss_fn(batch):
        if args.started_file:
            Path(args.started_file).touch()
        time.sleep(args.step_seconds)
        inputs, target = batch
        calls.append(1)
        loss = (model(inputs) - target).square().mean()
        return loss * float("nan") if len(calls) == args.nan_at_call and accelerator.is_main_process else loss

    run = train_steps(accelerator, args, model, [model], optimizer, scheduler, loader, loss_fn)
    bv.save_adapter(model, f"{args.output_dir}/adapter")  # every process (gathered where sharded)
    accelerator.end_training()  # (as the scripts do: a multi-process run leaves its process group cleanly)
    return {"step": run.step, "losses": run.losses}


if __name__ == "__main__":
    main(sys.argv[1:])
