"""Stable Diffusion (diffusers): target presets for the UNet and the CLIP text encoder, pipeline loading
with adapters attached, merged export, and the embedded tiny pipeline's architecture.

Adapter directories follow PEFT's DreamBooth example: ``DIR/unet/`` and optionally
``DIR/text_encoder/``, each an ``adapter_config.json`` + ``adapter_model.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import io as adapter_io
from ..inject import merge_and_unload

# UNet attention projections (+ the added-KV projections some UNets have), PEFT's DreamBooth recipe
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
UNET_PRESETS = {
    "attention": UNET_ATTENTION,
    "attention_ff": UNET_ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    # + the ResNet convolutions (conv1/conv2 of every ResNet block, and its 1×1 shortcut)
    "all": UNET_ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
                             "conv_shortcut"],
}
TEXT_ENCODER_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "qv": ["q_proj", "v_proj"],  # PEFT's BOFT DreamBooth example
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
EMBEDDED_ADAPTER = EMBEDDED.parent / "tiny-sd-sks-boft"  # bundled DreamBooth BOFT adapter (see its README)
EMBEDDED_CONTROL = EMBEDDED.parent / "tiny-sd-position-boft"  # bundled shape-position control (see its README)


def load_pipeline(name_or_path: str | Path = EMBEDDED, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ``StableDiffusionPipeline`` from a hub id or local folder (default: the embedded tiny model),
    without the safety checker (DreamBooth and interpolation look at raw outputs)."""
    from diffusers import StableDiffusionPipeline

    path = Path(name_or_path)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json: give a diffusers pipeline folder "
                                "(save_pretrained layout) or a hub id such as 'runwayml/stable-diffusion-v1-5'")
    pipe = StableDiffusionPipeline.from_pretrained(str(name_or_path), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def frozen_pipeline(name_or_path: str | Path, accelerator):
    """For training scripts: the pipeline with every module frozen and cast to the mixed-precision
    dtype on the accelerator's device (adapters added afterwards stay fp32), its DDPM training
    scheduler, and that dtype."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(name_or_path)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False).to(accelerator.device, dtype=dtype)
    return pipe, DDPMScheduler.from_config(pipe.scheduler.config), dtype


def lr_scheduler_from_args(args, optimizer, num_processes: int):
    """diffusers' named schedule over ``--max_train_steps`` (× processes: a prepared scheduler steps
    once per process for each optimizer step, as in diffusers' scripts)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


def adapter_parts(adapter_dir: str | Path) -> dict[str, Path]:
    """{"unet": DIR/unet, "text_encoder": DIR/text_encoder} for the parts the directory has."""
    adapter_dir = Path(adapter_dir)
    parts = {name: adapter_dir / name for name in ("unet", "text_encoder")
             if (adapter_dir / name / adapter_io.CONFIG_NAME).is_file()}
    if not parts:
        raise FileNotFoundError(f"{adapter_dir} has neither unet/{adapter_io.CONFIG_NAME} nor "
                                f"text_encoder/{adapter_io.CONFIG_NAME}: give the output_dir of "
                                "train_dreambooth_boft.py (or its adapter/ folder)")
    return parts


def attach_adapters(pipe, adapter_dir: str | Path, name: str = "default") -> list[str]:
    """Load DIR/unet (and DIR/text_encoder) into the pipeline's modules; returns the parts loaded."""
    parts = adapter_parts(adapter_dir)
    for part, folder in parts.items():
        adapter_io.load_adapter(getattr(pipe, part), folder, name=name)
    return list(parts)


def export_merged(pipe, out_dir: str | Path) -> None:
    """Merge the active adapters into the weights and ``save_pretrained`` a plain pipeline."""
    for part in ("unet", "text_encoder"):
        setattr(pipe, part, merge_and_unload(getattr(pipe, part)))
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


def denoising_loss(unet, vae, text_encoder, noise_scheduler, pixels: torch.Tensor, ids: torch.Tensor,
                   dtype: torch.dtype, control: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example MSE of the UNet's noise (or v) prediction at random timesteps: the training loss of
    DreamBooth and of the control script. ``control``: features added after ``conv_in``."""
    import torch.nn.functional as F

    with torch.no_grad():
        latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    context = text_encoder(ids)[0]
    if control is None:
        pred = unet(noisy, t, context).sample
    else:
        with control_signal(unet, control):
            pred = unet(noisy, t, context).sample
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


# --- control signals (ControlNet-style, BOFT paper §5) -------------------------------------------
class ControlEncoder(torch.nn.Module):
    """The light control-signal encoder: conv + SiLU stages, each stage a 3×3 conv then a stride-2
    3×3 conv, down to the latent resolution, then a zero-initialised conv to the UNet's first feature
    width (``conv_in``'s output). Its output is added to ``conv_in``'s output, so at initialisation the
    UNet is unchanged; 8 convolutions for SD's ×8 VAE (PEFT's BOFT ControlNet example), 4 for ×2."""

    def __init__(self, out_channels: int, downsamples: int, in_channels: int = 3,
                 channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        widths = channels[:downsamples + 1]
        if len(widths) != downsamples + 1:
            raise ValueError(f"{downsamples} downsamplings need {downsamples + 1} channel widths, got {channels}")
        self.config = {"out_channels": out_channels, "downsamples": downsamples, "in_channels": in_channels,
                       "channels": list(channels)}
        layers = [torch.nn.Conv2d(in_channels, widths[0], 3, padding=1), torch.nn.SiLU()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Conv2d(a, a, 3, padding=1), torch.nn.SiLU(),
                       torch.nn.Conv2d(a, b, 3, padding=1, stride=2), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.out = torch.nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(control))

    @classmethod
    def for_unet(cls, unet, vae_scale_factor: int) -> "ControlEncoder":
        import math

        return cls(unet.config.block_out_channels[0], int(math.log2(vae_scale_factor)))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  folder / "control_encoder.safetensors")
        (folder / "control_encoder.json").write_text(json.dumps(self.config, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "ControlEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "control_encoder.json").is_file():
            raise FileNotFoundError(f"{folder} has no control_encoder.json: give the output_dir of "
                                    "train_controlnet_boft.py")
        encoder = cls(**json.loads((folder / "control_encoder.json").read_text()))
        encoder.load_state_dict(load_file(folder / "control_encoder.safetensors"))
        return encoder


class control_signal:  # noqa: N801 (a context manager, used like a function)
    """``with control_signal(unet, features): unet(...)`` adds ``features`` (B, C, h, w) to the output of
    ``unet.conv_in`` on every call inside the block, repeated over the batch when the pipeline doubles
    it for classifier-free guidance. Where the features enter: after the UNet's first convolution, the
    point ControlNet's own hint enters its copy of the encoder — the cheapest place that every later
    block (and every adapted attention layer) sees."""

    def __init__(self, unet, features: torch.Tensor):
        self.unet, self.features, self.handle = unet, features, None

    def _add(self, module, args, output):
        features = self.features.to(output.dtype)
        if output.shape[0] != features.shape[0]:
            features = features.repeat(output.shape[0] // features.shape[0], 1, 1, 1)
        return output + features

    def __enter__(self):
        self.handle = self.unet.conv_in.register_forward_hook(self._add)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- the embedded tiny pipeline's architecture ---------------------------------------------------
TINY = {"image_size": 32, "latent_channels": 4, "width": 32, "text_width": 32, "max_length": 16}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (base symbols of the BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def build_clip_tokenizer(words: list[str], max_length: int):
    """A CLIP BPE tokenizer whose merges spell each of ``words`` as one token; any other text still
    tokenizes (into byte-level pieces), as with CLIP's own vocabulary."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged, *symbols[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=max_length)


def tiny_components(words: list[str], seed: int = 0) -> dict:
    """Untrained components of the embedded pipeline: VAE (32 px → 4×16×16 latents), UNet with
    cross-attention at both resolutions (width 32/64), 2-layer CLIP text encoder, tokenizer, DDPM."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    t = TINY
    tokenizer = build_clip_tokenizer(words, t["max_length"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=t["text_width"], intermediate_size=2 * t["text_width"],
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=t["max_length"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=t["text_width"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=t["latent_channels"],
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                        sample_size=t["image_size"])
    unet = UNet2DConditionModel(
        sample_size=t["image_size"] // 2, in_channels=t["latent_channels"], out_channels=t["latent_channels"],
        block_out_channels=(t["width"], 2 * t["width"]), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=t["text_width"], attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def pipeline_from_components(components: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    pipe = StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                   tokenizer=components["tokenizer"], unet=components["unet"], scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_grid(images, cols: int, min_cell: int = 128):
    """Images pasted into rows of ``cols``; small images are scaled up (nearest) to ``min_cell`` px."""
    from PIL import Image

    w, h = images[0].size
    scale = max(1, min_cell // w)
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def read_model_card(path: str | Path = EMBEDDED) -> dict:
    card = Path(path) / "boftvision_training.json"
    return json.loads(card.read_text()) if card.is_file() else {}
