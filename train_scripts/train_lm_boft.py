"""Causal-LM instruction tuning with an adapter: JSONL of {"prompt": …, "response": …}, loss on the
response tokens only.

    accelerate launch train_scripts/train_lm_boft.py --pretrained_model_name_or_path meta-llama/Llama-2-7b-hf \
        --train_file alpaca.jsonl --adapter boft --boft_block_size 8 --boft_n_butterfly_factor 2 \
        --mixed_precision bf16 --gradient_checkpointing --output_dir outputs/llama-boft
    python train_scripts/train_lm_boft.py generate --pretrained_model_name_or_path PATH --adapter_path DIR --prompt "…"

``--load_in_4bit`` loads the base with bitsandbytes (QLoRA-style, as the VB-LoRA paper did) when it is
installed; adapters stay fp32. Checkpoints every ``--checkpointing_steps``; ``--resume_from_checkpoint``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import boftvision as bv
from boftvision.data.text import read_rows
from boftvision.files import check_model_location, write_text_atomic
from boftvision.integrations.language import add_task_adapter
from boftvision.training import (
    RENAMED,
    EpochBatches,
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
    stop_requested,
    tracked_accelerator,
)

IGNORE = -100


def tokenize_pair(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """input_ids = prompt + response + eos; labels = -100 over the prompt (loss on the response only)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_batch(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_location(args.model_name_or_path, "--pretrained_model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {}
    if getattr(args, "load_in_4bit", False):
        from transformers import BitsAndBytesConfig  # needs bitsandbytes and a GPU

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    return tokenizer, model


def train(args) -> dict:
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint, keep=(args.train_file,))
    accelerator = tracked_accelerator(args, "lm", mixed_precision=args.mixed_precision,
                                      gradient_accumulation_steps=args.gradient_accumulation_steps)
    seed_everything(args.seed)
    tokenizer, model = load_model(args)
    # the adapter's initial values and the data order, the same however the model loaded (under DeepSpeed
    # ZeRO-3 transformers builds it partitioned, drawing no random numbers)
    seed_everything(args.seed)
    add_task_adapter(model, adapter_config_from_args(args, None), preset=args.targets, heads=[])
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad path
    rows = read_rows(args.train_file)
    examples = [tokenize_pair(tokenizer, r[args.prompt_column], r[args.response_column], args.max_length)
                for r in rows]
    loader = DataLoader(examples, args.train_batch_size, shuffle=True,
                        collate_fn=lambda b: pad_batch(b, tokenizer.pad_token_id))
    optimizer = make_optimizer(model, args, args.learning_rate, args.weight_decay)
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps / accelerator.num_processes)
    total = args.max_train_steps or updates_per_epoch * args.epochs
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    out = Path(args.output_dir)
    step, losses, epoch, partial = 0, [], 0, None
    checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, run_settings(args),
                                accelerator.print)
        step, losses, epoch, partial = state["step"], state["losses"], state.get("epoch", 0), state.get("partial")
    progress = tqdm(total=total, initial=step, disable=not accelerator.is_local_main_process)
    model.train()  # from_pretrained returns the model in eval mode
    with StopSignals() as stop:
        while step < total:
            batches = EpochBatches(loader, partial)  # a resumed epoch continues where its checkpoint stopped
            partial = None
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    stop_if_diverged(loss, step + 1, accelerator)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                losses.append(loss.item())
                accelerator.log({"loss": losses[-1], "lr": scheduler.get_last_lr()[0]}, step=step)
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
                extra = {"losses": losses, "settings": run_settings(args), "epoch": epoch, "partial": batches.state()}
                if stop_requested(stop, accelerator):  # any process signalled: a checkpoint at this step, then exit
                    save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, step, extra)
                    exit_for_signal(stop, accelerator, step, out / f"checkpoint-{step}", progress)
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, step, extra,
                                    keep=args.checkpoints_total_limit)
                if step >= total:
                    break
            else:
                epoch += 1
    progress.close()
    result = {"steps": step, "losses": losses, "processes": accelerator.num_processes,
              **vars(bv.count_parameters(accelerator.unwrap_model(model)))}
    bv.save_adapter(model, out / "adapter")  # every process: FSDP's shards are gathered, process 0 writes
    if accelerator.is_main_process:
        write_text_atomic(out / "results.json", json.dumps(result, indent=2))
        save_loss_plot(out / "loss.png", losses)
        accelerator.print(f"wrote {out / 'adapter'}, {out / 'results.json'} and {out / 'loss.png'}")
    accelerator.end_training()
    return result


@torch.no_grad()
def generate(args) -> str:
    tokenizer, model = load_model(args)
    bv.load_adapter(model, args.adapter_dir, is_trainable=False)
    if args.merge:
        bv.merge_adapter(model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    output = model.eval().generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["train", "generate"], default="train",
                   help="train, or generate with a saved adapter")
    p.add_argument("--pretrained_model_name_or_path", "--model_name_or_path", action=RENAMED,
                   dest="model_name_or_path", required=True)
    p.add_argument("--train_file", help="JSONL/CSV with prompt and response columns")
    p.add_argument("--prompt_column", default="prompt",
                   help="JSONL/CSV key of the prompt")
    p.add_argument("--response_column", default="response",
                   help="JSONL/CSV key of the response (the only tokens in the loss)")
    p.add_argument("--targets", default="all_linear", choices=["attention", "all_linear", "all_linear_but_head"])
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--num_train_epochs", "--epochs", dest="epochs", action=RENAMED, type=int, default=3)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_ratio", type=float, default=0.03)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--load_in_4bit", action="store_true", help="load the base in 4 bit (bitsandbytes, GPU)")
    p.add_argument("--seed", type=int, default=0)
    add_report_to_argument(p)
    p.add_argument("--output_dir", default="outputs/lm")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--adapter_path", "--adapter_dir", dest="adapter_dir", action=RENAMED,
                   help="generate: the saved adapter")
    p.add_argument("--prompt", help="generate: the prompt")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generate: tokens to generate")
    p.add_argument("--merge", action="store_true", help="generate: merge the adapter first")
    add_adapter_arguments(p)
    args = describe_flags(p).parse_args(argv)
    if args.command == "train" and not args.train_file:
        p.error("train needs --train_file")
    if args.command == "generate" and not (args.adapter_dir and args.prompt):
        p.error("generate needs --adapter_path and --prompt")
    return args


def main(argv=None):
    args = parse_args(argv)
    return train(args) if args.command == "train" else generate(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
