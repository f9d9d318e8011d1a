"""Sequence classification (GLUE-style) with an adapter on a transformers encoder.

    accelerate launch train_scripts/train_glue_boft.py --pretrained_model_name_or_path microsoft/deberta-v3-base \
        --task_name cola --adapter boft --boft_block_size 8 --boft_n_butterfly_factor 2 --seeds 0 1 2
    python train_scripts/train_glue_boft.py --pretrained_model_name_or_path PATH --train_file train.csv \
        --validation_file dev.csv --text_columns sentence --label_column label --num_labels 2

Metrics per task (accuracy, F1, Matthews for CoLA, Pearson/Spearman for STS-B); several seeds, the
median reported; results.json + results.md; ``--adapter none`` trains only the head (a linear probe of
the frozen encoder). Checkpoints every epoch; ``--resume_from_checkpoint latest`` continues a run.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import boftvision as bv
from boftvision.data.text import GLUE_MAIN_METRIC, GLUE_TASKS, load_glue, read_rows, text_examples
from boftvision.files import check_model_location, write_text_atomic
from boftvision.integrations.language import SEQ_CLS_HEADS, add_task_adapter
from boftvision.metrics.classification import glue_metrics
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
                   dest="model_name_or_path", required=True)
    p.add_argument("--task_name", choices=sorted(GLUE_TASKS), default=None,
                   help="a GLUE task name (datasets' glue config, needs the hub)")
    p.add_argument("--train_file", default=None, help="CSV/TSV/JSONL training file (instead of --task_name)")
    p.add_argument("--validation_file", default=None,
                   help="CSV/TSV/JSONL validation file")
    p.add_argument("--text_columns", nargs="+", default=["sentence"],
                   help="column(s) holding the text (one, or a pair)")
    p.add_argument("--label_column", default="label", help="column holding the label")
    p.add_argument("--num_labels", type=int, default=2, help="1 = regression")
    p.add_argument("--targets", default="all_linear", choices=["attention", "all_linear", "all_linear_but_head"])
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--num_train_epochs", "--epochs", dest="epochs", action=RENAMED, type=int, default=10)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--head_learning_rate", type=float, default=None, help="default: --learning_rate")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    add_report_to_argument(p)
    p.add_argument("--output_dir", default="outputs/glue")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    add_adapter_arguments(p, allow_none=True)
    args = describe_flags(p).parse_args(argv)
    if args.task_name:
        args.text_columns, args.num_labels = list(GLUE_TASKS[args.task_name][0]), GLUE_TASKS[args.task_name][1]
    elif not (args.train_file and args.validation_file):
        p.error("give --task_name, or --train_file and --validation_file")
    return args


def load_data(args):
    regression = args.num_labels == 1
    if args.task_name:
        val = "validation_matched" if args.task_name == "mnli" else "validation"
        splits = {"train": load_glue(args.task_name, "train"), "validation": load_glue(args.task_name, val)}
        sources = {k: f"glue/{args.task_name}/{k}" for k in splits}
    else:
        splits = {"train": read_rows(args.train_file), "validation": read_rows(args.validation_file)}
        sources = {"train": args.train_file, "validation": args.validation_file}
    return {k: text_examples(rows, args.text_columns, args.label_column, regression, sources[k])
            for k, rows in splits.items()}


def build_model(args):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_location(args.model_name_or_path, "--pretrained_model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=args.num_labels)
    if model.config.pad_token_id is None:
        pad = tokenizer.pad_token_id
        model.config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if args.adapter == "none":  # linear probe: frozen encoder, trainable head
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in SEQ_CLS_HEADS)
    else:
        add_task_adapter(model, adapter_config_from_args(args, None), preset=args.targets)
    return tokenizer, model


def collate(tokenizer, max_length, regression):
    def fn(batch):
        texts = list(zip(*[texts for texts, _ in batch]))
        enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([label for _, label in batch], dtype=torch.float if regression else torch.long)
        return enc
    return fn


@torch.no_grad()
def evaluate(model, loader, accelerator, regression: bool) -> dict[str, float]:
    model.eval()
    preds, labels = [], []
    for batch in loader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        pred = logits.squeeze(-1) if regression else logits.argmax(-1)
        pred, label = accelerator.gather_for_metrics((pred, batch["labels"]))
        preds.append(pred.float().cpu())
        labels.append(label.float().cpu())
    return glue_metrics(torch.cat(preds).numpy(), torch.cat(labels).numpy(), regression)


def train_and_evaluate(args, accelerator, data, seed: int, run_dir: Path) -> dict:
    seed_everything(seed)
    regression = args.num_labels == 1
    tokenizer, model = build_model(args)
    counts = bv.count_parameters(model)
    fn = collate(tokenizer, args.max_length, regression)
    train_loader = DataLoader(data["train"], args.train_batch_size, shuffle=True, collate_fn=fn)
    eval_loader = DataLoader(data["validation"], args.eval_batch_size, collate_fn=fn)
    optimizer = make_optimizer(model, args, args.learning_rate, args.weight_decay)
    run = prepare_epochs(accelerator, model, optimizer, train_loader, eval_loader, args.epochs, args.warmup_ratio,
                         run_dir, args.resume_from_checkpoint, run_settings(args))
    model, optimizer, train_loader, eval_loader, scheduler = (run.model, run.optimizer, run.train_loader,
                                                              run.eval_loader, run.scheduler)
    steps_per_epoch, total = run.steps_per_epoch, run.total
    start, history = run.state["epoch"], run.state.get("history", [])
    partial = run.state.get("partial")  # a mid-epoch checkpoint (written on SIGTERM/SIGINT)
    progress = tqdm(total=total, initial=start * steps_per_epoch + (partial or {}).get("batches_done", 0),
                    desc=f"seed {seed}", disable=not accelerator.is_local_main_process)
    with StopSignals() as stop:
        for epoch in range(start, args.epochs):
            model.train()  # from_pretrained returns the model in eval mode
            batches = EpochBatches(train_loader, partial if epoch == start else None)
            running = partial["loss_sum"] if partial and epoch == start else 0.0
            for batch in batches:
                loss = model(**batch).loss
                stop_if_diverged(loss, progress.n + 1, accelerator)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                running += loss.item()
                progress.update(1)
                if stop_requested(stop, accelerator):  # any process signalled: a mid-epoch checkpoint, then exit
                    save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, progress.n,
                                    extra={"epoch": epoch, "history": history, "settings": run_settings(args),
                                           "partial": batches.state(loss_sum=running)})
                    exit_for_signal(stop, accelerator, progress.n, run_dir / f"checkpoint-{progress.n}", progress)
            metrics = evaluate(model, eval_loader, accelerator, regression)
            history.append({"epoch": epoch + 1, "train_loss": running / max(1, len(train_loader)), **metrics})
            progress.set_postfix(loss=f"{history[-1]['train_loss']:.3f}")
            accelerator.log({f"seed{seed}/{k}": v for k, v in history[-1].items() if k != "epoch"}, step=epoch + 1)
            save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler,  # every process
                            (epoch + 1) * steps_per_epoch,
                            extra={"epoch": epoch + 1, "history": history, "settings": run_settings(args)},
                            keep=args.checkpoints_total_limit)
    progress.close()
    result = {"seed": seed, "final": history[-1], "history": history, "trainable": counts.trainable,
              "stored": counts.stored}
    if args.adapter != "none":  # every process (sharded: gathered), process 0 writes
        bv.save_adapter(accelerator.unwrap_model(model), run_dir / "adapter")
    if accelerator.is_main_process:
        write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                     keep=(args.train_file, args.validation_file))
    accelerator = tracked_accelerator(args, "glue", mixed_precision=args.mixed_precision)
    data = load_data(args)
    out = Path(args.output_dir)
    runs = [train_and_evaluate(args, accelerator, data, seed, out / f"seed{seed}") for seed in args.seeds]
    metric_names = list(runs[0]["final"])[2:]
    summary = {name: statistics.median(r["final"][name] for r in runs) for name in metric_names}
    main_metric = GLUE_MAIN_METRIC.get(args.task_name, "pearson" if args.num_labels == 1 else "accuracy")
    report = {"task": args.task_name or Path(args.train_file).stem, "adapter": args.adapter,
              "median": summary, "main_metric": main_metric, "trainable": runs[0]["trainable"],
              "stored": runs[0]["stored"], "runs": runs}
    if accelerator.is_main_process:
        write_text_atomic(out / "results.json", json.dumps(report, indent=2))
        table = ("| task | adapter | trainable | stored | " + " | ".join(metric_names) + " |\n|"
                 + "---|" * (4 + len(metric_names)) + f"\n| {report['task']} | {args.adapter} | "
                 f"{report['trainable']:,} | {report['stored']:,} | "
                 + " | ".join(f"{summary[m]:.2f}" for m in metric_names) + " |\n")
        write_text_atomic(out / "results.md", table)
        save_loss_plot(out / "loss.png", [h["train_loss"] for h in runs[0]["history"]], "epoch")
        print(table)
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'loss.png'} and the adapters under "
              f"{out}/seed<N>/adapter")
    accelerator.end_training()
    return report


if __name__ == "__main__":
    run_cli(main)
