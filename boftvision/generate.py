"""Text-to-image with adapters, and the butterfly interpolation path as one PNG grid.

    python -m boftvision.generate --adapter_path outputs/sks --prompt "a photo of sks shape" --seed 0 \
        --interpolate --out interpolation.png

``--pretrained_model_name_or_path`` defaults to the base model the adapter recorded, else the embedded
tiny pipeline. With ``--interpolate`` (a BOFT/OFT adapter) the grid holds, left to right, the fine-tuned
model and then 1, …, m butterfly components set to identity, and last the base model (all components
identity and the output scale reset); every image starts from the same initial noise, so only the
adapter changes along the row. With ``--control IMAGE`` (an adapter from train_controlnet_boft.py) the
control image comes first and every image but the base one is generated under it (the paper's Fig. 10
path from control-following to the unconditioned model).
"""
from __future__ import annotations

import argparse
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .inject import adapter_configs, disable_adapter
from .integrations.diffusers import (
    ControlEncoder,
    attach_adapters,
    base_model_for,
    control_signal,
    export_run,
    image_grid,
    load_pipeline,
)
from .interpolate import butterfly_interpolation, num_butterfly_components
from .training import RENAMED, describe_flags, run_cli


def adapted_parts(pipe) -> list[torch.nn.Module]:
    parts = (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))  # SDXL has a second encoder
    return [m for m in parts if m is not None and adapter_configs(m)]


def initial_noise(pipe, seed: int, n: int = 1) -> torch.Tensor:
    size = pipe.unet.config.sample_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, pipe.unet.config.in_channels, size, size)
    return torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)


@torch.no_grad()
def generate(pipe, prompt: str, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5, n: int = 1,
             control: torch.Tensor | None = None, on_step=None):
    """``n`` images from the seed's noise; ``control``: control-encoder features (see control_features);
    ``on_step(i)`` is called after each denoising step (progress bars)."""
    kwargs = {}
    if on_step is not None:
        def callback(pipeline, i, t, tensors):
            on_step(i + 1)
            return tensors
        kwargs["callback_on_step_end"] = callback
    with ExitStack() as stack:
        if control is not None:
            stack.enter_context(control_signal(pipe.unet, control))
        return pipe([prompt] * n, latents=initial_noise(pipe, seed, n), num_inference_steps=steps,
                    guidance_scale=guidance_scale, **kwargs).images


@torch.no_grad()
def control_features(pipe, adapter_dir, control_image) -> torch.Tensor:
    """Features of a control image from the control encoder saved in ``adapter_dir``."""
    from PIL import Image

    from .data.controlnet import to_tensor

    encoder = ControlEncoder.load(adapter_dir).to(pipe.device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = control_image if isinstance(control_image, Image.Image) else Image.open(control_image)
    return encoder(to_tensor(image, size, signed=False)[None].to(pipe.device))


def orthogonal_parts(pipe) -> list[torch.nn.Module]:
    """The pipeline's modules with an active BOFT/OFT adapter."""
    parts = []
    for part in adapted_parts(pipe):
        try:
            num_butterfly_components(part)
        except ValueError:  # additive adapters only
            continue
        parts.append(part)
    return parts


def path_length(pipe) -> int:
    """m: the number of butterfly components of the pipeline's adapters (0 when none is orthogonal)."""
    return max((num_butterfly_components(part) for part in orthogonal_parts(pipe)), default=0)


def set_identity_components(pipe, n_identity: int, reset_scale: bool = False) -> None:
    """Butterfly interpolation on every adapted part of the pipeline (UNet, text encoder)."""
    parts = orthogonal_parts(pipe)
    if not parts:
        raise ValueError("interpolation needs a BOFT or OFT adapter; this pipeline's adapters are additive "
                         "(LoRA/VB-LoRA) or absent")
    for part in parts:
        butterfly_interpolation(part, min(n_identity, num_butterfly_components(part)), reset_scale)


@torch.no_grad()
def interpolation_path(pipe, prompt: str, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5,
                       control: torch.Tensor | None = None, on_step=None):
    """[(label, image)] from the fine-tuned model (0 components set to I) to the base model;
    ``on_step(done, total)`` after each denoising step of the whole path."""
    m = path_length(pipe)
    total, path = (m + 2) * steps, []

    def stepper(k):
        return None if on_step is None else (lambda i: on_step(k * steps + i, total))

    try:
        for k in range(m + 1):
            set_identity_components(pipe, k)
            label = "fine-tuned" if k == 0 else f"{k}/{m} -> I"
            path.append((label, generate(pipe, prompt, seed, steps, guidance_scale, control=control,
                                         on_step=stepper(k))[0]))
    finally:
        set_identity_components(pipe, 0)
    with ExitStack() as stack:
        for part in adapted_parts(pipe):
            stack.enter_context(disable_adapter(part))
        path.append(("base", generate(pipe, prompt, seed, steps, guidance_scale,
                                      on_step=stepper(m + 1))[0]))  # no control either
    return path


def labelled_grid(path, cols: int | None = None):
    from PIL import ImageDraw

    grid = image_grid([image for _, image in path], cols=cols or len(path))
    cell = grid.width // (cols or len(path))
    draw = ImageDraw.Draw(grid)
    for i, (label, _) in enumerate(path):
        x, y = (i % (cols or len(path))) * cell, (i // (cols or len(path))) * cell
        draw.rectangle([x, y, x + 7 * len(label) + 6, y + 14], fill="white")
        draw.text((x + 3, y + 2), label, fill="black")
    return grid


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="model", action=RENAMED,
                   default=None, help="diffusers pipeline folder or hub id (default: the base model the "
                   "adapter recorded, else the embedded tiny pipeline)")
    p.add_argument("--adapter_path", "--adapter", dest="adapter", action=RENAMED,
                   help="train_dreambooth_boft.py's output_dir (unet/ [+ text_encoder/]), or a "
                                     "diffusers/kohya LoRA .safetensors file")
    p.add_argument("--prompt", help="what to draw (needed unless --export)")
    p.add_argument("--export", metavar="DIR", help="instead of images: write model + adapter merged as a "
                   "plain pipeline folder (StableDiffusionPipeline.from_pretrained loads it)")
    p.add_argument("--export_single_file", metavar="FILE", help="instead of images: write model + adapter merged "
                   "as one original-layout Stable Diffusion checkpoint (.safetensors) for AUTOMATIC1111/ComfyUI")
    p.add_argument("--export_lycoris", metavar="FILE", help="instead of images: write the adapter as a LyCORIS "
                   "file (.safetensors) for ComfyUI/AUTOMATIC1111/kohya (LoRA, VB-LoRA; OFT/BOFT trained with "
                   "--orientation output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", "--steps", dest="steps", action=RENAMED, type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_images", type=int, default=4, help="without --interpolate")
    p.add_argument("--interpolate", action="store_true",
                   help="a grid of the butterfly interpolation path instead of samples")
    p.add_argument("--control", help="control image (needs an --adapter dir from train_controlnet_boft.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="generated.png", help="the PNG file to write (default: %(default)s)")
    args = describe_flags(p).parse_args(argv)
    exports = [flag for flag in ("export", "export_single_file", "export_lycoris") if getattr(args, flag)]
    if exports and not args.adapter:
        p.error(f"--{exports[0]} needs --adapter_path (what to export onto the base model)")
    if not (args.prompt or exports):
        p.error("give --prompt (or --export DIR, --export_single_file FILE, --export_lycoris FILE)")
    args.model = base_model_for(args.adapter, args.model)
    if exports:
        export_run(args.adapter, args.model, lycoris_file=args.export_lycoris, single_file=args.export_single_file,
                   merged=args.export)
        for flag in exports:
            print(f"wrote {getattr(args, flag)}")
        return Path(getattr(args, exports[0]))
    if args.interpolate and not args.adapter:
        p.error("--interpolate needs --adapter_path")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = load_pipeline(args.model, dtype=dtype, device=args.device)
    if args.adapter:
        attach_adapters(pipe, args.adapter)
    control = None
    if args.adapter and not args.control and (Path(args.adapter) / "control_encoder.json").is_file():
        warnings.warn(f"{args.adapter} holds a control encoder but no --control image was given: the images are "
                      "not controlled", stacklevel=2)
    if args.control:
        if not args.adapter:
            p.error("--control needs --adapter_path (the output_dir of train_controlnet_boft.py)")
        control = control_features(pipe, args.adapter, args.control)
    if args.interpolate:
        with tqdm(desc="interpolation path", unit="step") as bar:
            def advance(done, total):
                bar.total = total
                bar.update(done - bar.n)
            path = interpolation_path(pipe, args.prompt, args.seed, args.steps, args.guidance_scale, control,
                                      on_step=advance)
        if args.control:
            from PIL import Image

            size = path[0][1].size
            path.insert(0, ("control", Image.open(args.control).convert("RGB").resize(size)))
        grid = labelled_grid(path)
    else:
        with tqdm(total=args.steps, desc="denoising", unit="step") as bar:
            images = generate(pipe, args.prompt, args.seed, args.steps, args.guidance_scale, args.num_images, control,
                              on_step=lambda i: bar.update(i - bar.n))
        grid = image_grid(images, cols=args.num_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
