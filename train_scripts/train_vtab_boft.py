"""Fine-tune DINOv2 with an adapter on VTAB-1K tasks (one, several or all 19) and report top-1.

    accelerate launch train_scripts/train_vtab_boft.py --data_root /data/vtab-1k --tasks all \
        --pretrained_model_name_or_path facebook/dinov2-large --adapter boft --boft_block_size 8 \
        --boft_n_butterfly_factor 2 --seeds 0 1 2 --output_dir outputs/vtab

The BOFT paper's recipe is the default: all linear layers of attention and MLP, 30 epochs, batch 64,
AdamW (wd 0.02), cosine with 10% warm-up, multiplicative dropout 0.1, per-task learning rate
(``--hparams file.json`` = {"task": {"learning_rate": …}}), final-epoch top-1 on test after training on
train800val200. ``--search_lrs`` first picks each task's rate on train800 → val200.
Writes per run: adapter/ (PEFT layout), head.safetensors, result.json; overall: results.json and a
Markdown table in the paper's format (results.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import boftvision as bv
from boftvision.data.vtab import GROUPS, TASKS, VTABDataset
from boftvision.files import write_text_atomic
from boftvision.integrations.dinov2 import PRESETS, Dinov2Classifier, add_classifier_adapter, load_backbone
from boftvision.metrics.classification import top1_accuracy
from boftvision.sharding import full_tensor
from boftvision.training import (
    RENAMED,
    EpochBatches,
    StopSignals,
    adapter_config_from_args,
    add_adapter_arguments,
    add_report_to_argument,
    claim_output_dir,
    describe_flags,
    exit_for_signal,
    make_optimizer,
    prepare_epochs,
    run_cli,
    run_settings,
    save_checkpoint,
    save_loss_plot,
    seed_everything,
    stop_if_diverged,
    stop_requested,
    tracked_accelerator,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", "--model_name_or_path", action=RENAMED,
                   dest="model_name_or_path", default="facebook/dinov2-large")
    p.add_argument("--backbone_source", choices=["transformers", "timm"], default="transformers")
    p.add_argument("--timm_checkpoint", default=None)
    p.add_argument("--timm_kwargs", type=json.loads, default=None,
                   help='JSON of timm.create_model overrides for the backbone, e.g. \'{"drop_path_rate": 0.1}\'')
    p.add_argument("--data_root", required=True)
    p.add_argument("--allow_paths_outside_data_dir", action="store_true",
                   help="let the dataset's listing name files outside its folder (absolute or ../ paths)")
    p.add_argument("--tasks", nargs="+", default=["all"], help="VTAB-1K task folders to run, or 'all' (the 19 tasks)")
    p.add_argument("--num_classes", type=int, default=None, help="for task folders outside the 19")
    p.add_argument("--targets", choices=sorted(PRESETS), default="all_linear")
    p.add_argument("--num_train_epochs", "--epochs", dest="epochs", action=RENAMED, type=int, default=30)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--hparams", default=None, help="JSON {task: {learning_rate: …}}")
    p.add_argument("--search_lrs", type=float, nargs="*", default=[],
                   help="learning rates tried on train800 → val200 per task; the best is used for the final run")
    p.add_argument("--weight_decay", type=float, default=0.02)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dataloader_num_workers", "--num_workers", dest="num_workers", action=RENAMED,
                   type=int, default=2)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--output_dir", default="outputs/vtab")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--checkpointing_epochs", type=int, default=1)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    add_report_to_argument(p)
    p.add_argument("--skip_bad_files", action="store_true")
    add_adapter_arguments(p)
    args = describe_flags(p).parse_args(argv)
    args.tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    return args


def build_model(args, num_classes: int, seed: int) -> Dinov2Classifier:
    backbone = load_backbone(args.model_name_or_path, args.backbone_source, args.timm_checkpoint, args.image_size,
                             args.timm_kwargs)
    # the head's and the adapter's initial values and the data order, the same however the backbone loaded
    # (under DeepSpeed ZeRO-3 transformers builds it partitioned, drawing no random numbers)
    seed_everything(seed)
    model = Dinov2Classifier(backbone, num_classes)
    return add_classifier_adapter(model, adapter_config_from_args(args, PRESETS[args.targets]))


def train_and_evaluate(args, accelerator: Accelerator, task: str, seed: int, lr: float, train_split: str,
                       eval_split: str, run_dir: Path) -> dict:
    """Train one (task, seed, lr) and return its final-epoch accuracy on ``eval_split``."""
    seed_everything(seed)
    train_set = VTABDataset(args.data_root, task, train_split, args.image_size, args.num_classes,
                            allow_outside=args.allow_paths_outside_data_dir, skip_bad=args.skip_bad_files)
    eval_set = VTABDataset(args.data_root, task, eval_split, args.image_size, args.num_classes,
                           allow_outside=args.allow_paths_outside_data_dir, skip_bad=args.skip_bad_files)
    model = build_model(args, train_set.num_classes, seed)
    params = bv.count_parameters(model.backbone)
    optimizer = make_optimizer(model, args, lr, args.weight_decay)
    train_loader = DataLoader(train_set, args.train_batch_size, shuffle=True, num_workers=args.num_workers,
                              drop_last=False)
    eval_loader = DataLoader(eval_set, args.eval_batch_size, num_workers=args.num_workers)
    run = prepare_epochs(accelerator, model, optimizer, train_loader, eval_loader, args.epochs, args.warmup_ratio,
                         run_dir, args.resume_from_checkpoint, run_settings(args))
    model, optimizer, train_loader, eval_loader, scheduler = (run.model, run.optimizer, run.train_loader,
                                                              run.eval_loader, run.scheduler)
    steps_per_epoch, total = run.steps_per_epoch, run.total
    start_epoch, losses = run.state["epoch"], run.state.get("losses", [])

    partial = run.state.get("partial")  # a mid-epoch checkpoint (written on SIGTERM/SIGINT)
    progress = tqdm(total=total, initial=start_epoch * steps_per_epoch + (partial or {}).get("batches_done", 0),
                    desc=f"{task} s{seed} lr{lr:g}", disable=not accelerator.is_local_main_process)
    with StopSignals() as stop:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            batches = EpochBatches(train_loader, partial if epoch == start_epoch else None)
            epoch_loss = partial["loss_sum"] if partial and epoch == start_epoch else 0.0
            for images, labels in batches:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                stop_if_diverged(loss, progress.n + 1, accelerator)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch_loss += loss.item()
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
                if stop_requested(stop, accelerator):  # any process signalled: a mid-epoch checkpoint, then exit
                    save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, progress.n,
                                    extra={"epoch": epoch, "losses": losses, "settings": run_settings(args),
                                           "partial": batches.state(loss_sum=epoch_loss)})
                    exit_for_signal(stop, accelerator, progress.n, run_dir / f"checkpoint-{progress.n}", progress)
            losses.append(epoch_loss / max(1, len(train_loader)))
            accelerator.log({f"{task}/seed{seed}/loss": losses[-1]}, step=epoch)
            if (epoch + 1) % args.checkpointing_epochs == 0:  # every process: a sharded model is gathered
                save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler,
                                (epoch + 1) * steps_per_epoch,
                                extra={"epoch": epoch + 1, "losses": losses, "settings": run_settings(args)},
                                keep=args.checkpoints_total_limit)
    progress.close()

    accuracy = top1_accuracy(model, eval_loader, accelerator)
    result = {"task": task, "seed": seed, "learning_rate": lr, "eval_split": eval_split, "top1": accuracy,
              "epoch_losses": losses, "adapter_trainable": params.trainable, "adapter_stored": params.stored,
              "num_classes": train_set.num_classes, "image_size": args.image_size,
              "backbone": {"model_name_or_path": args.model_name_or_path, "backbone_source": args.backbone_source,
                           "timm_checkpoint": args.timm_checkpoint, "timm_kwargs": args.timm_kwargs}}
    unwrapped = accelerator.unwrap_model(model)
    bv.save_adapter(unwrapped.backbone, run_dir / "adapter")  # every process (sharded: gathered), process 0 writes
    head = {k: full_tensor(v).contiguous() for k, v in unwrapped.head.state_dict(keep_vars=True).items()}
    if accelerator.is_main_process:
        save_file(head, str(run_dir / "head.safetensors"))
        write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def markdown_table(results: list[dict], params: int) -> str:
    """The paper's format: 19 tasks, group means, overall mean; mean ± std over seeds."""
    per_task = {}
    for r in results:
        per_task.setdefault(r["task"], []).append(r["top1"])
    cells, means = [], {}
    extra = [t for t in per_task if t not in TASKS]  # a custom task: its own column after the 19
    for task in [*TASKS, *extra]:
        scores = per_task.get(task)
        if scores:
            means[task] = statistics.mean(scores)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{means[task]:.1f} ± {std:.1f}" if len(scores) > 1 else f"{means[task]:.1f}")
        else:
            cells.append("–")
    group = {g: statistics.mean([means[t] for t in ts if t in means]) if any(t in means for t in ts) else None
             for g, ts in GROUPS.items()}
    group_cells = [f"{v:.1f}" if v is not None else "–" for v in group.values()]
    overall = f"{statistics.mean(means.values()):.1f}" if means else "–"
    header = ["params (M)", *TASKS, *extra, *GROUPS, "mean"]
    row = [f"{params / 1e6:.2f}", *cells, *group_cells, overall]
    return "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| " + " | ".join(row) + " |\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                     keep=(args.data_root,))
    accelerator = tracked_accelerator(args, "vtab", mixed_precision=args.mixed_precision)
    hparams = json.loads(Path(args.hparams).read_text()) if args.hparams else {}
    out = Path(args.output_dir)
    results = []
    for task in args.tasks:
        lr = hparams.get(task, {}).get("learning_rate", args.learning_rate)
        if args.search_lrs:
            scores = {c: train_and_evaluate(args, accelerator, task, args.seeds[0], c, "train800", "val200",
                             out / task / f"search-lr{c:g}")["top1"] for c in args.search_lrs}
            lr = max(scores, key=scores.get)
            accelerator.print(f"{task}: val200 top-1 by lr {scores} → {lr:g}")
        for seed in args.seeds:
            results.append(train_and_evaluate(args, accelerator, task, seed, lr, "train800val200", "test",
                                              out / task / f"seed{seed}"))
            accelerator.print(f"{task} seed {seed}: test top-1 {results[-1]['top1']:.2f}")
    if accelerator.is_main_process:
        params = results[0]["adapter_stored"] if results else 0
        write_text_atomic(out / "results.json", json.dumps(results, indent=2))
        write_text_atomic(out / "results.md", markdown_table(results, params))
        print(markdown_table(results, params))
        if results:
            save_loss_plot(out / "loss.png", results[-1]["epoch_losses"], "epoch",
                           f"{results[-1]['task']} seed {results[-1]['seed']}")
        print(f"wrote {out / 'results.json'}, {out / 'results.md'} and the adapters under {out}/<task>/seed<N>")
    accelerator.end_training()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
