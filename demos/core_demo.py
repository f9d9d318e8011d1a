"""Core demo (the README's main job until the Stable Diffusion issue lands).

A small frozen "pretrained" network (Linear + Conv2d layers) is adapted to a teacher whose weights
differ by a small random rotation-plus-noise; each method trains briefly. Prints, per method: trainable
and stored parameters, loss before/after, time per step, the merged-vs-unmerged output error, and
checks that the saved adapter reloads (PEFT layout) to identical outputs.

    python demos/core_demo.py [--max_train_steps 150] [--output_dir outputs/core_demo]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import boftvision as bv
from boftvision.training import RENAMED, describe_flags, run_cli


class Backbone(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.stem = nn.Conv2d(16, 32, 3, padding=1)
        self.mix = nn.Conv2d(32, 32, 1)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x, img):
        h = self.fc2(torch.relu(self.fc1(x)))
        return h, self.mix(torch.relu(self.stem(img)))


TARGETS = ["stem", "mix", "fc1", "fc2"]
METHODS = {
    "LoRA r=8": bv.LoRAConfig(r=8, alpha=16, target_modules=TARGETS),
    "VB-LoRA h=64 L=16 k=2": bv.VBLoRAConfig(r=4, num_vectors=64, vector_length=16, target_modules=TARGETS),
    "OFT b=16": bv.OFTConfig(block_size=16, use_cayley_neumann=False, target_modules=TARGETS),
    "BOFT m=2 b=8": bv.BOFTConfig(block_size=8, n_butterfly_factor=2, target_modules=TARGETS),
    "BOFT m=3 b=4": bv.BOFTConfig(block_size=4, n_butterfly_factor=3, target_modules=TARGETS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_train_steps", "--steps", dest="steps", action=RENAMED, type=int, default=150)
    parser.add_argument("--learning_rate", "--lr", dest="lr", action=RENAMED, type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", "--out", dest="out", action=RENAMED, default="outputs/core_demo")
    args = describe_flags(parser).parse_args()

    torch.manual_seed(args.seed)
    base, teacher = Backbone(), Backbone()
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.03 * torch.randn_like(p))
    x, img = torch.randn(512, 128), torch.randn(16, 16, 12, 12)
    with torch.no_grad():
        target = teacher(x, img)

    rows = []
    for name, config in METHODS.items():
        torch.manual_seed(args.seed)
        model = bv.add_adapter(copy.deepcopy(base), config)
        optim = torch.optim.AdamW(bv.parameter_groups(model, lr=args.lr, vector_bank_lr=1e-3,
                                                      logits_lr=1e-2), lr=args.lr)

        def loss_fn():
            return sum(nn.functional.mse_loss(o, t) for o, t in zip(model(x, img), target))

        first = loss_fn().item()
        start = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=name, leave=False):
            optim.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optim.step()
        step_ms = 1000 * (time.perf_counter() - start) / args.steps
        model.eval()
        with torch.no_grad():
            final = loss_fn().item()
            out = model(x, img)
            bv.merge_adapter(model)
            merge_err = max((a - b).abs().max().item() for a, b in zip(model(x, img), out))
            bv.unmerge_adapter(model)
        folder = Path(args.out) / name.split()[0].lower().replace("-", "")
        bv.save_adapter(model, folder)
        reloaded = bv.load_adapter(copy.deepcopy(base), folder).eval()
        with torch.no_grad():
            reload_err = max((a - b).abs().max().item() for a, b in zip(reloaded(x, img), out))
        counts = bv.count_parameters(model)
        rows.append(dict(method=name, trainable=counts.trainable, stored=counts.stored, loss_start=first,
                         loss_end=final, ms_per_step=step_ms, merge_error=merge_err, reload_error=reload_err))

    header = "| method | trainable | stored | loss start | loss end | ms/step | merged Δ | reloaded Δ |"
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {r['stored']:,} | {r['loss_start']:.4f} | "
              f"{r['loss_end']:.4f} | {r['ms_per_step']:.1f} | {r['merge_error']:.1e} | {r['reload_error']:.1e} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"adapters and results.json in {args.out}")


if __name__ == "__main__":
    run_cli(main)
