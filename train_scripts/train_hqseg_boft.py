"""Adapt SAM's mask decoder on HQSeg-44K (image and prompt encoders frozen) and report mIoU / mBIoU.

    python train_scripts/train_hqseg_boft.py --data_root data --model_type vit_h \
        --checkpoint sam_vit_h_4b8939.pth --adapter boft --boft_block_size 8 --boft_n_butterfly_factor 2 \
        --cache_dir cache/embeddings --output_dir outputs/hqseg

The BOFT paper's setting is the default: all decoder linear layers, 10 epochs, lr 5e-4, cosine, AdamW
(wd 0.01), multiplicative dropout 0.005. Each training image gets one prompt drawn from a noised box,
foreground points or a noised coarse mask (HQ-SAM's mix); the loss is BCE + Dice on the mask at the
image's resolution. Validation (box prompts) uses the same code as train_scripts/eval_hqseg.py.
``--cache_dir`` stores the frozen encoder's embeddings so later epochs touch only the decoder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

import boftvision as bv
from boftvision.data.hqseg import EVAL_SETS, TRAIN_SETS, HQSegDataset, noisy_box, random_points
from boftvision.files import write_text_atomic
from boftvision.integrations.sam import (
    PRESETS,
    build_sam,
    coarse_mask_prompt,
    decode,
    embedding_cache,
    evaluate_sets,
    freeze_encoders,
    image_embedding,
    load_sam,
    logits_to_original,
    scores_table,
    segmentation_loss,
)
from boftvision.training import (
    RENAMED,
    StopSignals,
    adapter_config_from_args,
    add_adapter_arguments,
    add_report_to_argument,
    claim_output_dir,
    cosine_with_warmup,
    describe_flags,
    exit_for_signal,
    load_checkpoint,
    make_optimizer,
    resolve_checkpoint,
    run_cli,
    run_settings,
    save_checkpoint,
    save_loss_plot,
    seed_everything,
    stop_if_diverged,
    tracked_accelerator,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True)
    p.add_argument("--train_sets", nargs="+", default=list(TRAIN_SETS), help="HQSeg-44K training sets")
    p.add_argument("--eval_sets", nargs="+", default=list(EVAL_SETS), help="evaluation sets")
    p.add_argument("--model_type", default="vit_h", help="SAM size: vit_b, vit_l or vit_h")
    p.add_argument("--checkpoint", default=None, help="SAM weights (.pth)")
    p.add_argument("--sam_config", default=None, help="JSON for build_sam (a SAM outside the registry)")
    p.add_argument("--random_init", action="store_true",
                   help="train on a randomly initialised SAM when no --checkpoint is given (tests, experiments)")
    p.add_argument("--targets", choices=sorted(PRESETS), default="decoder_all_linear")
    p.add_argument("--num_train_epochs", "--epochs", dest="epochs", action=RENAMED, type=int, default=10)
    p.add_argument("--train_batch_size", "--batch_size", dest="batch_size", action=RENAMED,
                   type=int, default=4, help="images per optimizer step")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_report_to_argument(p)
    p.add_argument("--skip_bad_files", action="store_true")
    p.add_argument("--output_dir", default="outputs/hqseg")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    add_adapter_arguments(p, defaults={"boft_dropout": 0.005})
    args = describe_flags(p).parse_args(argv)
    if args.checkpoint is None and not args.random_init:
        p.error("give --checkpoint (SAM's weights, e.g. sam_vit_h_4b8939.pth): without it SAM is random and the "
                "scores mean nothing; pass --random_init to train a random SAM on purpose")
    return args


def build(args):
    if args.sam_config:
        sam = build_sam(json.loads(Path(args.sam_config).read_text()), args.checkpoint)
    else:
        sam = load_sam(args.model_type, args.checkpoint)
    freeze_encoders(sam)
    return sam.to(args.device)


def prompt_for(sam, mask: np.ndarray, rng: np.random.Generator) -> dict:
    kind = rng.integers(3)
    if kind == 0:
        return {"box": noisy_box(mask, rng)}
    if kind == 1:
        return {"points": random_points(mask, rng)}
    return {"coarse_mask": coarse_mask_prompt(sam, mask, rng)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                     keep=(args.data_root, args.cache_dir))
    tracker = tracked_accelerator(args, "hqseg", cpu=True)  # trackers only: the loop places tensors itself
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    sam = build(args)
    bv.add_adapter(sam.mask_decoder, adapter_config_from_args(args, PRESETS[args.targets]))
    counts = bv.count_parameters(sam.mask_decoder)
    train_set = HQSegDataset.from_sets(args.data_root, args.train_sets, args.skip_bad_files)
    eval_sets = {name: HQSegDataset.from_sets(args.data_root, [name], args.skip_bad_files) for name in args.eval_sets}
    cache = embedding_cache(args.cache_dir, args.model_type, args.checkpoint, args.sam_config)
    optimizer = make_optimizer(sam, args, args.learning_rate, args.weight_decay)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    out = Path(args.output_dir)
    state = {"epoch": 0, "losses": [], "validation": []}
    checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, sam, optimizer, scheduler, run_settings(args))
        rng = np.random.default_rng([args.seed, state["epoch"]])
    before = state["before"] if "before" in state else evaluate_sets(sam, eval_sets, cache)
    partial = state.pop("partial", None)  # a mid-epoch checkpoint (written on SIGTERM/SIGINT)

    progress = tqdm(total=total, initial=state["epoch"] * steps_per_epoch + (partial or {}).get("batches_done", 0),
                    desc="hqseg")
    with StopSignals() as stop:
        for epoch in range(state["epoch"], args.epochs):
            rng = np.random.default_rng([args.seed, epoch])  # resumable: the epoch fixes order and prompts
            sam.train()
            order, epoch_loss, first = rng.permutation(len(train_set)), 0.0, 0
            if partial is not None:  # continue the interrupted epoch where it stopped, prompts included
                rng.bit_generator.state = partial["rng"]
                epoch_loss, first, partial = partial["loss_sum"], partial["next_start"], None
            for start in range(first, len(order), args.batch_size):
                loss = 0.0
                for i in order[start:start + args.batch_size]:
                    image, mask, stem = train_set[i]
                    embedding = image_embedding(sam, image, cache / "train" / f"{stem}.pt" if cache else None)
                    logits = decode(sam, embedding, mask.shape, **prompt_for(sam, mask, rng))
                    full = logits_to_original(sam, logits, mask.shape)
                    target = torch.as_tensor(mask, dtype=torch.float32, device=full.device)
                    loss = loss + segmentation_loss(full, target)
                loss = loss / len(order[start:start + args.batch_size])
                stop_if_diverged(loss, progress.n + 1)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch_loss += loss.item()
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
                if stop.signal:  # a mid-epoch checkpoint, then exit
                    mid = {**state, "epoch": epoch, "before": before, "settings": run_settings(args),
                           "partial": {"rng": rng.bit_generator.state, "next_start": start + args.batch_size,
                                       "loss_sum": epoch_loss, "batches_done": start // args.batch_size + 1}}
                    save_checkpoint(out, sam, optimizer, scheduler, progress.n, extra=mid)
                    exit_for_signal(stop, SimpleNamespace(print=print), progress.n, out / f"checkpoint-{progress.n}",
                                    progress)
            state["losses"].append(epoch_loss / steps_per_epoch)
            tracker.log({"loss": state["losses"][-1]}, step=epoch + 1)
            state["validation"].append(evaluate_sets(sam, eval_sets, cache))
            state["epoch"], state["before"], state["settings"] = epoch + 1, before, run_settings(args)
            save_checkpoint(out, sam, optimizer, scheduler, (epoch + 1) * steps_per_epoch, extra=state,
                            keep=args.checkpoints_total_limit)
    progress.close()

    result = {"before": before, "after": state["validation"][-1], "epoch_losses": state["losses"],
              "trainable": counts.trainable, "stored": counts.stored}
    bv.save_adapter(sam.mask_decoder, out / "adapter")
    write_text_atomic(out / "results.json", json.dumps(result, indent=2))
    write_text_atomic(out / "results.md", f"Frozen decoder:\n\n{scores_table(before)}\nAdapted ({args.adapter}, "
                                    f"{counts.stored:,} stored parameters):\n\n{scores_table(result['after'])}")
    save_loss_plot(out / "loss.png", state["losses"], "epoch")
    print((out / "results.md").read_text())
    print(f"wrote {out / 'adapter'}, {out / 'results.json'}, {out / 'results.md'} and {out / 'loss.png'}")
    tracker.end_training()
    return result


if __name__ == "__main__":
    run_cli(main)
