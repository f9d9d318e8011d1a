"""DreamBooth for Stable Diffusion with BOFT (or OFT, LoRA, VB-LoRA) adapters on the UNet and,
optionally, the text encoder.

    accelerate launch train_scripts/train_dreambooth_boft.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_data_dir dog-class --class_prompt "a photo of dog" \
        --num_class_images 200 --train_text_encoder --resolution 512 --train_batch_size 1 \
        --learning_rate 3e-5 --max_train_steps 1000 --adapter boft --boft_block_size 8 \
        --boft_n_butterfly_factor 2 --mixed_precision fp16 --output_dir outputs/sks-dog

Without ``--pretrained_model_name_or_path`` the embedded tiny pipeline is used (see the README).
The recipe of PEFT's BOFT DreamBooth example: UNet attention projections, text-encoder q/v, prior
preservation with 200 class images, lr 3e-5, ~1000 steps, batch 1, 512 px.

Adapter parameters stay fp32 under fp16/bf16 mixed precision (the base weights are cast, the adapters
added afterwards). Checkpoints (``--checkpointing_steps``) hold the adapters, optimizer, scheduler, step
and RNG; ``--resume_from_checkpoint latest`` continues from the newest one. Output: ``unet/`` and
``text_encoder/`` adapters in PEFT's layout, ``results.json``, ``validation/step-N.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import boftvision as bv
from boftvision.data.dreambooth import IMAGE_SUFFIXES, DreamBoothDataset, collate, list_images
from boftvision.files import write_text_atomic
from boftvision.integrations.diffusers import (
    EMBEDDED,
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    cache_latents,
    denoising_loss,
    export_run,
    frozen_pipeline,
    image_grid,
    load_pipeline,
    lr_scheduler_from_args,
)
from boftvision.integrations.diffusers.pipeline import conditioning
from boftvision.integrations.diffusers.sdxl import SDXLTextEncoder, SDXLTokenizers, is_sdxl
from boftvision.sharding import Part, Parts, full_parameters
from boftvision.training import (
    LYCORIS_FILE,
    RENAMED,
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

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=str(EMBEDDED))
    p.add_argument("--instance_data_dir", required=True, help="folder of the subject's images")
    p.add_argument("--instance_prompt", required=True,
                   help='prompt naming the subject with its rare token ("a photo of sks dog")')
    p.add_argument("--with_prior_preservation", action="store_true",
                   help="also train on class images with --class_prompt (keeps the class's look)")
    p.add_argument("--class_data_dir",
                   help="class images; generated with the base model up to --num_class_images when short")
    p.add_argument("--class_prompt", help='prompt of the class images ("a photo of dog")')
    p.add_argument("--num_class_images", type=int, default=100,
                   help="class images to use (generated when the folder has fewer)")
    p.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the class-image loss")
    p.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class-image generation")
    p.add_argument("--train_text_encoder", action="store_true", help="adapt the text encoder too")
    p.add_argument("--unet_targets", choices=sorted(UNET_PRESETS), default="attention")
    p.add_argument("--text_encoder_targets", choices=sorted(TEXT_ENCODER_PRESETS), default="qv")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps (default: --num_train_epochs epochs, diffusers' rule)")
    p.add_argument("--learning_rate", type=float, default=3e-5)
    p.add_argument("--lr_scheduler", default="constant",
                   choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                            "polynomial"])
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--weight_decay", "--adam_weight_decay", dest="weight_decay", type=float, default=1e-2,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate's configuration")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--validation_prompt")
    p.add_argument("--validation_steps", type=int, default=None,
                   help="draw validation images every N steps (default: every --validation_epochs epochs, else 100)")
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--report_to", default="none", help="none, tensorboard, wandb, … (accelerate trackers)")
    p.add_argument("--dataloader_num_workers", "--num_dataloader_workers", action=RENAMED, type=int,
                   default=0, help="data-loading worker processes (default: %(default)s)")
    p.add_argument("--peft_compatible", action="store_true")
    p.add_argument("--save_merged", action="store_true",
                   help="also write output_dir/merged: a plain pipeline with the adapters merged "
                        "(StableDiffusionPipeline.from_pretrained loads it)")
    p.add_argument("--skip_bad_files", action="store_true")
    p.add_argument("--max_nonfinite_steps", type=int, default=0)
    g = p.add_argument_group("SDXL (diffusers' train_dreambooth_lora_sdxl.py flags)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 training)")
    g.add_argument("--crops_coords_top_left_h", type=int, default=0, help="SDXL's crop conditioning: top")
    g.add_argument("--crops_coords_top_left_w", type=int, default=0, help="SDXL's crop conditioning: left")
    g = p.add_argument_group("more of diffusers' and PEFT's DreamBooth flags")
    g.add_argument("--rank", type=int, default=None, help="the adapter's rank (LoRA r, VB-LoRA r); diffusers' name")
    g.add_argument("--use_boft", action="store_true", help="PEFT's example: the same as --adapter boft")
    g.add_argument("--boft_bias", default="none", choices=["none"],
                   help="PEFT's example: bias training, 'none' only (boftvision trains no biases)")
    g.add_argument("--image_interpolation_mode", default="bilinear",
                   choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
                   help="resampling when resizing the images (default: %(default)s)")
    g.add_argument("--tokenizer_max_length", type=int, default=None,
                   help="tokens per prompt (default: the tokenizer's model_max_length)")
    g.add_argument("--text_encoder_use_attention_mask", action="store_true",
                   help="pass the prompt's attention mask to the text encoder")
    g.add_argument("--pre_compute_text_embeddings", action="store_true",
                   help="encode the prompts once (the text encoder is frozen: not with --train_text_encoder)")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode the images with the VAE once, before training (each keeps the crop and flip it "
                        "was first drawn with); saves the VAE's forward pass every step")
    g.add_argument("--class_labels_conditioning", default=None, choices=["timesteps"],
                   help="pass the timesteps as class labels to UNets that have a class embedding")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="dtype of class-image generation (default: fp16 on CUDA, else fp32)")
    g.add_argument("--validation_images", nargs="+", default=None,
                   help="diffusers' image-to-image validation inputs: not used by text-to-image DreamBooth")
    g.add_argument("--set_grads_to_none", action="store_true", help="PEFT's example; gradients are always set to "
                   "None after a step here")
    g.add_argument("--no_tracemalloc", action="store_true", help="PEFT's example: no memory tracing (none is done)")
    g.add_argument("--wandb_key", default=None, help="PEFT's example: W&B API key (with --report_to wandb)")
    g.add_argument("--wandb_project_name", default="dreambooth-boft", help="W&B project (with --report_to wandb)")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name (with --report_to wandb)")
    add_diffusers_training_arguments(p)
    add_export_arguments(p)
    add_adapter_arguments(p, defaults={"boft_dropout": 0.1})
    args = describe_flags(p).parse_args(argv)
    if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt):
        p.error("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if not args.with_prior_preservation and (args.class_data_dir or args.class_prompt):
        warnings.warn("--class_data_dir/--class_prompt are ignored without --with_prior_preservation", stacklevel=2)
    if args.use_boft:
        args.adapter = "boft"
    if args.rank is not None:
        if args.adapter not in ("lora", "vblora"):
            p.error(f"--rank sets the rank of LoRA / VB-LoRA; {args.adapter} has none (its size flags are "
                    f"--{args.adapter}_block_size / --{args.adapter}_block_num)")
        setattr(args, f"{args.adapter}_r", args.rank)
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        p.error("--pre_compute_text_embeddings needs a frozen text encoder: drop --train_text_encoder")
    if args.validation_images:
        p.error("--validation_images is for diffusers' image-to-image DreamBooth; this script validates with "
                "--validation_prompt")
    return args


@torch.no_grad()
def generate_class_images(args, accelerator: Accelerator) -> None:
    """Fill --class_data_dir up to --num_class_images with the base model's images of --class_prompt."""
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    missing = args.num_class_images - have
    if missing <= 0 or not accelerator.is_main_process:
        return
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    pipe = load_pipeline(args.pretrained_model_name_or_path, device=accelerator.device, dtype=dtype,
                         **load_options(args))
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    for start in tqdm(range(0, missing, args.sample_batch_size), desc="class images"):
        n = min(args.sample_batch_size, missing - start)
        images = pipe([args.class_prompt] * n, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, generator=generator).images
        for k, image in enumerate(images):
            image.save(folder / f"class-{have + start + k:05d}.png")
    del pipe
    free_memory()


def load_options(args) -> dict:
    return {"revision": args.revision, "variant": args.variant, "tokenizer_name": args.tokenizer_name,
            "vae_name_or_path": args.pretrained_vae_model_name_or_path}


def prompt_attention_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """The tokenizer's attention mask for padded ids: 1 up to and including the first end token (CLIP
    pads with its end token, so ids alone do not tell padding from the end)."""
    end = ids == tokenizer.eos_token_id
    return ((end.cumsum(-1) - end.long()) == 0).long()


def cached_by_ids(encode):
    """``encode`` computed once per distinct prompt (diffusers' --pre_compute_text_embeddings: the
    frozen text encoder runs once per prompt, not once per step). Keeps SDXL's added conditions too."""
    cache = {}

    def cached(ids):
        rows = []
        for row in ids:
            key = tuple(row.flatten().tolist())
            if key not in cache:
                with torch.no_grad():
                    context, extra = conditioning(encode(row[None]))
                cache[key] = (context[0], None if extra is None else {k: v[0] for k, v in extra.items()})
            rows.append(cache[key])
        context = torch.stack([c for c, _ in rows])
        if rows[0][1] is None:
            return (context,)
        return context, {k: torch.stack([extra[k] for _, extra in rows]) for k in rows[0][1]}
    return cached


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- validation ------------------------------------------------------------------------------------
@torch.no_grad()
def validate(args, accelerator, pipe, models: dict, step: int) -> Path:
    """Images of --validation_prompt from the modules being trained (no copies), saved as one grid."""
    models = {part: accelerator.unwrap_model(m) for part, m in models.items()}
    modes = {part: m.training for part, m in models.items()}
    for part, model in models.items():
        setattr(pipe, part, model.eval())
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with accelerator.autocast():
        images = pipe([args.validation_prompt] * args.num_validation_images, generator=generator,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale).images
    for part, model in models.items():
        model.train(modes[part])
    path = Path(args.output_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=len(images)).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")
    free_memory()
    return path


# --- training --------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                     keep=(args.instance_data_dir, args.class_data_dir))
    out = Path(args.output_dir)
    # SDXL conditions on the first text encoder's penultimate layer: DDP must expect adapters without gradient
    accelerator = accelerator_from_args(args, find_unused_parameters=args.train_text_encoder)
    set_seed(args.seed)
    list_images(args.instance_data_dir, "--instance_data_dir", True, args.skip_bad_files)  # before any model
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
        accelerator.wait_for_everyone()

    pipe, noise_scheduler, weight_dtype = frozen_pipeline(args.pretrained_model_name_or_path, accelerator,
                                                          **load_options(args))
    sdxl = is_sdxl(pipe)  # two text encoders, pooled embeddings and time ids
    if sdxl and args.text_encoder_use_attention_mask:
        raise ValueError("--text_encoder_use_attention_mask: SDXL's text encoders take no attention mask here")
    if not sdxl and (args.crops_coords_top_left_h or args.crops_coords_top_left_w):
        warnings.warn("--crops_coords_top_left_h/w condition SDXL's UNet; this pipeline is not SDXL: ignored",
                      stacklevel=2)
    tokenizer = SDXLTokenizers(pipe.tokenizer, pipe.tokenizer_2) if sdxl else pipe.tokenizer
    vae, unet = pipe.vae, pipe.unet
    encoders = {"text_encoder": pipe.text_encoder, **({"text_encoder_2": pipe.text_encoder_2} if sdxl else {})}
    if args.tokenizer_max_length:
        tokenizer.model_max_length = args.tokenizer_max_length
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    base = args.pretrained_model_name_or_path
    bv.add_adapter(unet, adapter_config_from_args(args, UNET_PRESETS[args.unet_targets], base))
    if args.train_text_encoder:  # every text encoder (SDXL: both)
        for encoder in encoders.values():
            bv.add_adapter(encoder, adapter_config_from_args(args, TEXT_ENCODER_PRESETS[args.text_encoder_targets],
                                                             base))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in encoders.values():
                encoder.gradient_checkpointing_enable()
    trained = Parts({"unet": unet, **(encoders if args.train_text_encoder else {})})
    counts = bv.count_parameters(trained)

    size = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    dataset = DreamBoothDataset(args.instance_data_dir, args.instance_prompt, tokenizer, size, args.center_crop,
                                args.class_data_dir if args.with_prior_preservation else None, args.class_prompt,
                                args.skip_bad_files, args.image_interpolation_mode)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=False, collate_fn=collate,
                        num_workers=args.dataloader_num_workers)  # file order: a resumed run sees the same batches
    if args.cache_latents:  # one pass of the VAE; then batches of latent distributions in the same order
        loader = DataLoader(cache_latents(vae, loader, weight_dtype, accelerator.device), batch_size=None)
    diffusers_step_counts(args, len(loader), accelerator.num_processes)  # --num_train_epochs, --scale_lr, …
    optimizer = make_optimizer(trained, args, args.learning_rate, args.weight_decay)
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator.num_processes)
    if args.train_text_encoder and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # accelerate's FSDP and DeepSpeed prepare one model: the UNet and the text encoder(s) as one, each called
        # through it
        trained, optimizer, loader, lr_scheduler = accelerator.prepare(trained, optimizer, loader, lr_scheduler)
        unet, encoders = Part(trained, "unet"), {name: Part(trained, name) for name in encoders}
    elif args.train_text_encoder:
        unet, *prepared, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, *encoders.values(), optimizer, loader, lr_scheduler)
        encoders = dict(zip(encoders, prepared))
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if accelerator.is_main_process:
        if args.wandb_key:
            os.environ["WANDB_API_KEY"] = args.wandb_key
        accelerator.init_trackers(args.wandb_project_name, config=run_settings(args),
                                  init_kwargs={"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {})
    logger.info(f"{len(dataset)} examples, {args.max_train_steps} steps, adapter {args.adapter}: "
                f"{counts.trainable:,} trainable parameters", main_process_only=True)

    def encode(ids):  # the text encoder(s), with diffusers' attention-mask and pre-computing options
        if sdxl:
            crop = (args.crops_coords_top_left_h, args.crops_coords_top_left_w)
            return SDXLTextEncoder(*encoders.values(), size, crop)(ids)
        mask = prompt_attention_mask(ids, tokenizer) if args.text_encoder_use_attention_mask else None
        return encoders["text_encoder"](ids, attention_mask=mask)

    encode_text = cached_by_ids(encode) if args.pre_compute_text_embeddings else encode

    def loss_fn(batch):
        losses = denoising_loss(unet, vae, encode_text, noise_scheduler, batch.get("pixels"), batch["ids"],
                                weight_dtype, timesteps_as_class_labels=args.class_labels_conditioning == "timesteps",
                                latents=batch.get("latents"))
        if args.with_prior_preservation:  # instance half, class half
            instance, prior = losses.chunk(2)
            return instance.mean() + args.prior_loss_weight * prior.mean()
        return losses.mean()

    def validate_at(step):
        return validate(args, accelerator, pipe, {"unet": unet, **encoders}, step)

    unet.train()
    for encoder in encoders.values():
        encoder.train(args.train_text_encoder)
    models = [trained] if isinstance(unet, Part) else [unet, *encoders.values()] if args.train_text_encoder else [unet]
    run = train_steps(accelerator, args, trained, models, optimizer, lr_scheduler, loader, loss_fn,
                      validate_at if args.validation_prompt else None)
    result = {"steps": run.step, "losses": run.losses, "adapter": args.adapter, "processes": accelerator.num_processes,
              "instance_prompt": args.instance_prompt,
              "trainable_parameters": counts.trainable, "stored_parameters": counts.stored, "seconds": run.seconds,
              "checkpoints": [p.name for p in list_checkpoints(out)], "validation": run.validations}
    # every process: a sharded model's adapter is gathered (collective); process 0 writes
    with full_parameters(trained) if isinstance(unet, Part) else nullcontext():  # FSDP1: gathered as a whole
        for name, model in {"unet": unet, **(encoders if args.train_text_encoder else {})}.items():
            bv.save_adapter(model.module if isinstance(model, Part) else model, out / name,
                            peft_compatible=args.peft_compatible)
    if accelerator.is_main_process:
        if args.validation_prompt:
            if run.step % args.validation_steps or not result["validation"]:  # the last step's, once
                result["validation"].append(str(validate_at(run.step)))
        # exports from the saved files on a fresh base pipeline: the same under sharding as in one process
        export_run(out, args.pretrained_model_name_or_path, diffusers_lora=args.adapter == "lora",
                   lycoris_file=out / LYCORIS_FILE if args.export_format == "lycoris" else None,
                   single_file=out / SINGLE_FILE if args.save_single_file else None,
                   merged=out / "merged" if args.save_merged else None, **load_options(args))
        write_text_atomic(out / "results.json", json.dumps(result, indent=1))
        save_loss_plot(out / "loss.png", run.losses)
        if args.push_to_hub:
            result["hub_repo"] = push_to_hub(args)
        accelerator.print(f"wrote the adapter(s), results.json and loss.png to {out}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    run_cli(main)
