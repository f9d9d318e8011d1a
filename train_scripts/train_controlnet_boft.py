"""Controllable generation (ControlNet-style) with BOFT: a light control encoder whose features are
added after the UNet's first convolution, trained together with an orthogonal (or any) adapter on the
UNet's attention — instead of a full ControlNet copy of the encoder (BOFT paper §5, after OFT).

    accelerate launch train_scripts/train_controlnet_boft.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base --train_data_dir celeba-landmarks \
        --adapter boft --boft_block_size 8 --boft_n_butterfly_factor 2 --learning_rate 1e-5 \
        --resolution 512 --max_train_steps 20000 --mixed_precision fp16 --output_dir outputs/control

Data: a folder with ``metadata.jsonl`` (``image``, ``conditioning_image``, ``text`` per line; column
names configurable) as diffusers' ControlNet example lays it out, or ``--dataset_name`` (needs the
``datasets`` package and the network). Output: ``unet/`` adapter (PEFT layout), ``control_encoder.*``,
``results.json``, ``validation/step-N.png`` (control image beside each output). Without
``--pretrained_model_name_or_path`` the embedded tiny pipeline is used.
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType, set_seed
from PIL import Image
from torch.utils.data import DataLoader

import boftvision as bv
from boftvision.data.controlnet import ControlDataset, to_tensor
from boftvision.data.dreambooth import tokenize
from boftvision.files import write_text_atomic
from boftvision.integrations.diffusers import (
    EMBEDDED,
    UNET_PRESETS,
    ControlEncoder,
    control_signal,
    denoising_loss,
    export_run,
    frozen_pipeline,
    image_grid,
    lr_scheduler_from_args,
)
from boftvision.integrations.diffusers.sdxl import SDXLTextEncoder, SDXLTokenizers, is_sdxl
from boftvision.sharding import Part, Parts, full_parameters
from boftvision.training import (
    LYCORIS_FILE,
    SINGLE_FILE,
    accelerator_from_args,
    adapter_config_from_args,
    add_adapter_arguments,
    add_diffusers_training_arguments,
    add_export_arguments,
    claim_output_dir,
    describe_flags,
    diffusers_step_counts,
    list_checkpoints,
    make_optimizer,
    push_to_hub,
    run_cli,
    run_settings,
    save_loss_plot,
    train_steps,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=str(EMBEDDED))
    p.add_argument("--train_data_dir", help="folder with metadata.jsonl")
    p.add_argument("--allow_paths_outside_data_dir", action="store_true",
                   help="let the dataset's listing name files outside its folder (absolute or ../ paths)")
    p.add_argument("--dataset_name", help="a datasets hub name (online), e.g. oftverse/control-celeba-hq")
    p.add_argument("--image_column", default="image", help="metadata.jsonl key of the target image")
    p.add_argument("--conditioning_image_column", default="conditioning_image",
                   help="metadata.jsonl key of the control image")
    p.add_argument("--caption_column", default="text", help="metadata.jsonl key of the caption")
    p.add_argument("--unet_targets", choices=sorted(UNET_PRESETS), default="attention")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps (default: --num_train_epochs epochs, diffusers' rule)")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--encoder_learning_rate", type=float, default=None, help="default: --learning_rate")
    p.add_argument("--weight_decay", "--adam_weight_decay", dest="weight_decay", type=float, default=1e-2,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--validation_image", nargs="*", default=[], help="control image for the validation grid")
    p.add_argument("--validation_prompt", nargs="*", default=[], help="prompt per --validation_image")
    g = p.add_argument_group("more of diffusers' train_controlnet.py flags")
    g.add_argument("--dataset_config_name", default=None, help="config of --dataset_name (hub datasets)")
    g.add_argument("--max_train_samples", type=int, default=None, help="train on the first N examples only")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="share of examples whose caption is replaced by the empty prompt (fixed by --seed)")
    g.add_argument("--num_validation_images", type=int, default=1, help="images per validation control image")
    g.add_argument("--tracker_project_name", default="control-boft", help="tracker project name")
    g.add_argument("--set_grads_to_none", action="store_true", help="gradients are always set to None here")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="diffusers' ControlNet weights: not used — this script trains an adapter and a light "
                        "control encoder instead of a ControlNet")
    p.add_argument("--validation_steps", type=int, default=None,
                   help="validate every N steps (default: every --validation_epochs epochs, else 100)")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--skip_bad_files", action="store_true")
    p.add_argument("--save_merged", action="store_true",
                   help="also write output_dir/merged: the pipeline with the UNet adapter merged (control "
                        "signals still come from the saved control encoder: generate --control)")
    p.add_argument("--peft_compatible", action="store_true")
    p.add_argument("--max_nonfinite_steps", type=int, default=0)
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--report_to", default="none")
    add_adapter_arguments(p, allow_none=True, defaults={"boft_dropout": 0.1})
    add_diffusers_training_arguments(p)
    add_export_arguments(p)
    args = describe_flags(p).parse_args(argv)
    if args.controlnet_model_name_or_path:
        p.error("--controlnet_model_name_or_path: this script trains an adapter on the UNet plus a light control "
                "encoder, not a ControlNet; start without it")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        p.error("--proportion_empty_prompts must be in [0, 1]")
    if not (args.train_data_dir or args.dataset_name):
        p.error("give --train_data_dir (a folder with metadata.jsonl) or --dataset_name")
    if len(args.validation_image) != len(args.validation_prompt):
        p.error("--validation_image and --validation_prompt need the same number of entries")
    return args


def load_data(args, tokenizer, size: int):
    if args.train_data_dir:
        return ControlDataset(args.train_data_dir, tokenizer, size, image_column=args.image_column,
                              conditioning_image_column=args.conditioning_image_column,
                              caption_column=args.caption_column,
                              allow_outside=args.allow_paths_outside_data_dir, skip_bad=args.skip_bad_files)
    from datasets import load_dataset  # online only

    rows = load_dataset(args.dataset_name, args.dataset_config_name, split="train")

    class HubData(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = rows[i]
            return {"pixels": to_tensor(row[args.image_column], size, True),
                    "control": to_tensor(row[args.conditioning_image_column], size, False),
                    "ids": tokenize(tokenizer, row[args.caption_column])}

    return HubData()


class EmptyPrompts(torch.utils.data.Dataset):
    """diffusers' --proportion_empty_prompts: a fixed random share of the examples get the empty prompt
    (classifier-free guidance keeps working with the control)."""

    def __init__(self, dataset, tokenizer, proportion: float, seed: int):
        self.dataset, self.empty = dataset, tokenize(tokenizer, "")
        rng = np.random.default_rng(seed)
        self.emptied = set(np.flatnonzero(rng.random(len(dataset)) < proportion).tolist())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {**item, "ids": self.empty} if i in self.emptied else item


@torch.no_grad()
def validate(args, accelerator, pipe, unet, encoder, size: int, step: int) -> Path:
    """Each validation control image beside the image generated for it."""
    unet, encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(encoder)
    was_training = unet.training
    unet.eval()
    pipe.unet = unet
    cells = []
    for path, prompt in zip(args.validation_image, args.validation_prompt):
        control = to_tensor(Image.open(path), size, signed=False)[None].to(accelerator.device)
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        with control_signal(unet, encoder(control)), accelerator.autocast():
            images = pipe([prompt] * args.num_validation_images, generator=generator,
                          num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale).images
        cells += [Image.open(path).convert("RGB").resize(images[0].size), *images]
    unet.train(was_training)
    out = Path(args.output_dir) / "validation" / f"step-{step}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(cells, cols=1 + args.num_validation_images).save(out)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                     keep=(args.train_data_dir,))
    out = Path(args.output_dir)
    accelerator = accelerator_from_args(args)
    set_seed(args.seed)
    pipe, noise_scheduler, weight_dtype = frozen_pipeline(args.pretrained_model_name_or_path, accelerator,
                                                          revision=args.revision, variant=args.variant,
                                                          tokenizer_name=args.tokenizer_name)
    vae, unet = pipe.vae, pipe.unet
    size = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    if is_sdxl(pipe):  # both text encoders, pooled embeddings and time ids
        tokenizer = SDXLTokenizers(pipe.tokenizer, pipe.tokenizer_2)
        text_encoder = SDXLTextEncoder(pipe.text_encoder, pipe.text_encoder_2, size)
    else:
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    dataset = load_data(args, tokenizer, size)  # bad data fails before training starts
    if args.max_train_samples:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_train_samples, len(dataset))))
    if args.proportion_empty_prompts:
        dataset = EmptyPrompts(dataset, tokenizer, args.proportion_empty_prompts, args.seed)
    if args.adapter != "none":
        bv.add_adapter(unet, adapter_config_from_args(args, UNET_PRESETS[args.unet_targets],
                                                      args.pretrained_model_name_or_path))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    encoder = ControlEncoder.for_unet(unet, pipe.vae_scale_factor).to(accelerator.device)  # fp32, trained
    trained = Parts({"unet": unet, "control_encoder": encoder})
    counts = bv.count_parameters(trained)

    loader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=False,
                        num_workers=args.dataloader_num_workers)  # file order: exact resume
    diffusers_step_counts(args, len(loader), accelerator.num_processes)  # --num_train_epochs, --scale_lr, …
    optimizer = make_optimizer(trained, args, args.learning_rate, args.weight_decay)
    if args.encoder_learning_rate:
        encoder_params = {id(p) for p in encoder.parameters()}
        for group in optimizer.param_groups:
            if all(id(p) in encoder_params for p in group["params"]):
                group["lr"] = args.encoder_learning_rate
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator.num_processes)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # accelerate's FSDP and DeepSpeed prepare one model: the UNet and the control encoder as one, each called
        # through it
        trained, optimizer, loader, lr_scheduler = accelerator.prepare(trained, optimizer, loader, lr_scheduler)
        unet, encoder = Part(trained, "unet"), Part(trained, "control_encoder")
    else:
        unet, encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, encoder, optimizer, loader, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: v for k, v in run_settings(args).items()
                                                          if isinstance(v, (int, float, str, bool))})

    def loss_fn(batch):
        return denoising_loss(unet, vae, text_encoder, noise_scheduler, batch["pixels"], batch["ids"], weight_dtype,
                              control=encoder(batch["control"].float())).mean()

    def validate_at(step):
        return validate(args, accelerator, pipe, unet, encoder, size, step)

    unet.train()
    run = train_steps(accelerator, args, trained, [trained] if isinstance(unet, Part) else [unet, encoder], optimizer,
                      lr_scheduler, loader, loss_fn, validate_at if args.validation_image else None)
    result = {"steps": run.step, "losses": run.losses, "adapter": args.adapter, "processes": accelerator.num_processes,
              "trainable_parameters": counts.trainable, "seconds": run.seconds,
              "checkpoints": [p.name for p in list_checkpoints(out)], "validation": run.validations}
    # every process: a sharded model is gathered (FSDP1: as a whole); process 0 writes
    with full_parameters(trained) if isinstance(unet, Part) else nullcontext():
        if args.adapter != "none":
            bv.save_adapter(unet.module if isinstance(unet, Part) else unet, out / "unet",
                            peft_compatible=args.peft_compatible)
        (encoder.module if isinstance(encoder, Part) else accelerator.unwrap_model(encoder)).save(out)
    if accelerator.is_main_process:
        if args.validation_image:
            if run.step % args.validation_steps or not result["validation"]:  # the last step's, once
                result["validation"].append(str(validate_at(run.step)))
        if args.adapter != "none":  # exports from the saved files (the UNet's; the control encoder is ours)
            export_run(out, args.pretrained_model_name_or_path, diffusers_lora=args.adapter == "lora",
                       lycoris_file=out / LYCORIS_FILE if args.export_format == "lycoris" else None,
                       single_file=out / SINGLE_FILE if args.save_single_file else None,
                       merged=out / "merged" if args.save_merged else None)
        write_text_atomic(out / "results.json", json.dumps(result, indent=1))
        save_loss_plot(out / "loss.png", run.losses)
        if args.push_to_hub:
            result["hub_repo"] = push_to_hub(args)
        accelerator.print(f"wrote the adapter(s), results.json and loss.png to {out}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    run_cli(main)
