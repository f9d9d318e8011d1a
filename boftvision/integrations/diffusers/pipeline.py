"""Stable Diffusion pipelines: target presets for the UNet and the CLIP text encoder, loading with
adapters attached, the training loss and schedule, merged export.

Adapter directories follow PEFT's DreamBooth example: ``DIR/unet/`` and optionally
``DIR/text_encoder/``, each an ``adapter_config.json`` + ``adapter_model.safetensors``.
"""
from __future__ import annotations

import json
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from ... import io as adapter_io
from ...config import LoRAConfig
from ...files import atomic_folder, check_model_location
from ...inject import adapted_layers, adapter_configs, merge_and_unload, remove_adapter
from ...io import lycoris
from ...sharding import built_whole
from .control import control_signal

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
EMBEDDED = Path(__file__).resolve().parents[2] / "assets" / "tiny-sd"
EMBEDDED_ADAPTER = EMBEDDED.parent / "tiny-sd-sks-boft"  # bundled DreamBooth BOFT adapter (see its README)
EMBEDDED_CONTROL = EMBEDDED.parent / "tiny-sd-position-boft"  # bundled shape-position control (see its README)


def pipeline_class_name(name_or_path: str | Path, revision: str | None = None) -> str:
    """The pipeline class a diffusers folder or hub id names in its model_index.json."""
    path = Path(name_or_path)
    if path.exists():
        return json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(str(name_or_path), revision=revision).get("_class_name", "")


def load_pipeline(name_or_path: str | Path = EMBEDDED, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  revision: str | None = None, variant: str | None = None, tokenizer_name: str | None = None,
                  vae_name_or_path: str | None = None):
    """A ``StableDiffusionPipeline`` — or ``StableDiffusionXLPipeline`` when the folder or hub id is an SDXL
    pipeline (its model_index.json says so) — from a hub id or local folder (default: the embedded tiny
    model), without the safety checker (DreamBooth and interpolation look at raw outputs); ``revision``,
    ``variant``, another tokenizer and another VAE (SDXL's fp16-safe one) as diffusers' scripts take them."""
    import warnings

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    extra = {}
    if tokenizer_name:
        from transformers import AutoTokenizer

        extra["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_name, revision=revision, use_fast=False)
    if vae_name_or_path:
        from diffusers import AutoencoderKL

        location = check_model_location(vae_name_or_path, "VAE")
        extra["vae"] = AutoencoderKL.from_pretrained(location, torch_dtype=dtype)

    path = Path(check_model_location(name_or_path, "diffusers pipeline"))
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json: give a diffusers pipeline folder (save_pretrained "
                                "layout) or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    if pipeline_class_name(name_or_path, revision) == "StableDiffusionXLPipeline":
        cls = StableDiffusionXLPipeline
    else:
        cls, extra = StableDiffusionPipeline, {**extra, "safety_checker": None, "requires_safety_checker": False}
    with warnings.catch_warnings(), built_whole():  # (a pipeline runs whole, also under DeepSpeed ZeRO-3)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # diffusers' own rename
        pipe = cls.from_pretrained(str(name_or_path), torch_dtype=dtype, revision=revision, variant=variant, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def frozen_pipeline(name_or_path: str | Path, accelerator, **load_kwargs):
    """For training scripts: the pipeline with every module frozen and cast to the mixed-precision
    dtype on the accelerator's device (adapters added afterwards stay fp32), its DDPM training
    scheduler, and that dtype."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(name_or_path, **load_kwargs)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.unet):
        if module is not None:
            module.requires_grad_(False).to(accelerator.device)
            if dtype != torch.float32:
                module.to(dtype=dtype)
    return pipe, DDPMScheduler.from_config(pipe.scheduler.config), dtype


def lr_scheduler_from_args(args, optimizer, num_processes: int):
    """diffusers' named schedule over ``--max_train_steps`` (× processes: a prepared scheduler steps
    once per process for each optimizer step, as in diffusers' scripts)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes,
                         num_cycles=getattr(args, "lr_num_cycles", 1), power=getattr(args, "lr_power", 1.0))


DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
PARTS = ("unet", "text_encoder", "text_encoder_2")  # SD 1.x/2.x have the first two, SDXL all three


def diffusers_lora_file(path: str | Path) -> Path | None:
    """The diffusers/kohya LoRA file ``path`` names (the file, or a folder holding
    pytorch_lora_weights.safetensors and no unet/ adapter folder), else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    ours = (path / "unet" / adapter_io.CONFIG_NAME).is_file()
    if path.is_dir() and (path / DIFFUSERS_LORA_NAME).is_file() and not ours:
        return path / DIFFUSERS_LORA_NAME
    return None


def adapter_parts(adapter_dir: str | Path) -> dict[str, Path]:
    """{"unet": DIR/unet, "text_encoder": DIR/text_encoder} for the parts the directory has."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.name in PARTS and (adapter_dir / adapter_io.CONFIG_NAME).is_file():  # run/unet given
        return {adapter_dir.name: adapter_dir}
    parts = {name: adapter_dir / name for name in PARTS if (adapter_dir / name / adapter_io.CONFIG_NAME).is_file()}
    if not parts:
        raise FileNotFoundError(f"{adapter_dir} has neither unet/{adapter_io.CONFIG_NAME} nor "
                                f"text_encoder/{adapter_io.CONFIG_NAME} nor {DIFFUSERS_LORA_NAME}: give the "
                                "output_dir of train_dreambooth_boft.py (or its adapter/ folder), or a LoRA file")
    return parts


def recorded_base_model(adapter_dir: str | Path) -> str | None:
    """The base model an adapter folder was trained on (its adapter_config.json), if recorded."""
    if diffusers_lora_file(adapter_dir) is not None:
        return None
    for folder in adapter_parts(adapter_dir).values():
        base = json.loads((folder / adapter_io.CONFIG_NAME).read_text()).get("base_model_name_or_path")
        if base and Path(base).name in PARTS and (Path(base).parent / "model_index.json").is_file():
            return str(Path(base).parent)  # a component folder of a local pipeline: the pipeline
        if base:
            return base
    return None


def base_model_for(adapter_dir: str | Path | None, model: str | None = None) -> str:
    """The base pipeline to load with an adapter: ``model`` when given (with a warning when the adapter
    records another base), else the base the adapter records, else the embedded pipeline. A recorded local
    path missing on this machine is an error naming the fix — unless it is the embedded pipeline, installed
    elsewhere."""
    recorded = recorded_base_model(adapter_dir) if adapter_dir else None
    if model is None:
        if recorded and recorded.startswith("/") and not Path(recorded).exists():
            if Path(recorded).parts[-2:] != EMBEDDED.parts[-2:]:
                raise ValueError(f"the adapter was trained on {recorded}, which is not on this machine: pass "
                                 "--pretrained_model_name_or_path")
            recorded = None
        return recorded or str(EMBEDDED)
    if recorded and str(Path(recorded)) != str(Path(model)):
        warnings.warn(f"--pretrained_model_name_or_path {model} differs from the base the adapter was trained on "
                      f"({recorded}); the images will not be the run's", stacklevel=3)
    return model


def attach_adapters(pipe, adapter_dir: str | Path, name: str = "default") -> list[str]:
    """Load DIR/unet (and DIR/text_encoder) into the pipeline's modules — or a LyCORIS/kohya file
    (``lora_unet_…``/``lora_te_…``: LoRA, OFT, BOFT; see :func:`load_lycoris_file`) or a diffusers LoRA
    file (see :func:`load_diffusers_lora`); returns the parts loaded."""
    lora_file = diffusers_lora_file(adapter_dir)
    if lora_file is not None:
        state = lycoris.read_lycoris(lora_file)
        if lycoris.is_lycoris_state(state):
            return load_lycoris_file(pipe, lora_file, name, state)
        return load_diffusers_lora(pipe, lora_file, name)
    parts = adapter_parts(adapter_dir)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if "text_encoder_2" in parts and not sdxl:
        raise ValueError(f"{adapter_dir} holds a text_encoder_2 adapter: it was trained on an SDXL pipeline, and this "
                         "one is SD 1.x/2.x; pass the SDXL base it was trained on (--pretrained_model_name_or_path)")
    with ExitStack() as undo:
        for part, folder in parts.items():
            try:
                adapter_io.load_adapter(getattr(pipe, part), folder, name=name)
            except ValueError as err:
                kind = "an SDXL" if sdxl else "an SD 1.x/2.x"
                raise ValueError(f"{err} — this is {kind} pipeline: was the adapter trained on the other kind?") \
                    from err
            undo.callback(remove_adapter, getattr(pipe, part), name)
        undo.pop_all()
    return list(parts)


LYCORIS_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
LYCORIS_PREFIXES_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def lycoris_prefixes(pipe) -> dict[str, str]:
    """kohya's prefix of each part: lora_te for SD 1.x/2.x's text encoder, lora_te1/lora_te2 for SDXL's."""
    return LYCORIS_PREFIXES_SDXL if getattr(pipe, "text_encoder_2", None) is not None else LYCORIS_PREFIXES


def save_lycoris_file(pipe, path: str | Path, name: str | None = None) -> Path:
    """One LyCORIS ``.safetensors`` with the pipeline's adapters (UNet as ``lora_unet_…``, text encoder as
    ``lora_te_…``), the file ComfyUI, AUTOMATIC1111/Forge and kohya load (see :mod:`boftvision.io.lycoris`).
    ``name``: the adapter to write (default: each part's active one)."""
    parts = {}
    for part, prefix in lycoris_prefixes(pipe).items():
        model = getattr(pipe, part, None)
        if model is not None and adapter_configs(model):
            active = name or next(layer.active for _, layer in adapted_layers(model) if layer.active)
            parts[prefix] = (model, active)
    if not parts:
        raise ValueError("the pipeline has no adapter to export")
    names = {n for _, n in parts.values()}
    if len(names) > 1:
        raise ValueError(f"the UNet and text encoder have different active adapters {sorted(names)}; pass name=")
    return lycoris.save_lycoris({prefix: model for prefix, (model, _) in parts.items()}, path, names.pop())


def load_lycoris_file(pipe, path: str | Path, name: str = "default", state: dict | None = None) -> list[str]:
    """Load a LyCORIS/kohya file's ``lora_unet`` and ``lora_te`` modules into the UNet and text encoder
    (each part checked before any is changed: on an error the pipeline is left as it was)."""
    state = lycoris.read_lycoris(path) if state is None else state
    present = lycoris.file_prefixes(state)
    prefixes = lycoris_prefixes(pipe)
    unknown = present - set(prefixes.values())
    if unknown:
        raise ValueError(f"{path} holds {sorted(unknown)} modules, made for another kind of pipeline (SD 1.x: "
                         f"lora_te, SDXL: lora_te1/lora_te2); this one's parts are {sorted(prefixes.values())}")
    loaded = []
    with ExitStack() as undo:
        for part, prefix in prefixes.items():
            if prefix in present:
                lycoris.load_lycoris(getattr(pipe, part), state, prefix, name, source=path)
                undo.callback(remove_adapter, getattr(pipe, part), name)
                loaded.append(part)
        undo.pop_all()
    return loaded


def save_diffusers_lora(pipe, out_dir: str | Path) -> Path:
    """Write the pipeline's active LoRA adapters (UNet and, when adapted, text encoder) as diffusers'
    ``pytorch_lora_weights.safetensors``, through diffusers' own ``save_lora_weights``, so that
    ``pipe.load_lora_weights(out_dir)`` applies them. diffusers scales a LoRA by alpha/r only when it
    knows alpha; the file carries none, so the scale alpha/r is folded into ``lora_B`` (scale 1)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    layers = {}
    for part in PARTS:
        model = getattr(pipe, part, None)
        if model is None or not adapter_configs(model):
            continue
        state = {}
        for layer_name, layer in adapted_layers(model):
            adapter = layer.adapters[layer.active] if layer.active else None
            if adapter is None:
                continue
            if adapter.config.method != "lora":
                raise ValueError(f"{part}.{layer_name} holds a {adapter.config.method} adapter; diffusers' LoRA "
                                 "format holds LoRA only — export a merged pipeline (export_merged) instead")
            state[f"{layer_name}.lora_A.weight"] = adapter.lora_A.weight.detach().float().cpu().contiguous()
            state[f"{layer_name}.lora_B.weight"] = (adapter.lora_B.weight.detach().float() * adapter.scaling).cpu()
        layers[part] = state
    if not layers:
        raise ValueError("the pipeline has no LoRA adapter to export")
    with atomic_folder(out_dir, owns={DIFFUSERS_LORA_NAME}) as tmp:
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: three parts
            StableDiffusionXLPipeline.save_lora_weights(str(tmp), unet_lora_layers=layers.get("unet"),
                                                        text_encoder_lora_layers=layers.get("text_encoder"),
                                                        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
                                                        safe_serialization=True)
        else:
            StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=layers.get("unet"),
                                                      text_encoder_lora_layers=layers.get("text_encoder"),
                                                      safe_serialization=True)
    return Path(out_dir) / DIFFUSERS_LORA_NAME


def load_diffusers_lora(pipe, path: str | Path, name: str = "default") -> list[str]:
    """Load a diffusers LoRA file (``save_lora_weights``'s, PEFT keys or diffusers' older ones) or a
    kohya/AUTOMATIC1111 one (``lora_unet_…``/``lora_te_…``, converted by diffusers) as boftvision LoRA
    adapters on the UNet and text encoder, with the scale diffusers applies (alpha from the file's
    metadata or network alphas, else r). Safetensors only (never a pickle)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    path = Path(path)
    cls = StableDiffusionXLPipeline if getattr(pipe, "text_encoder_2", None) is not None else StableDiffusionPipeline
    state, alphas, metadata = cls.lora_state_dict(
        str(path.parent), weight_name=path.name, use_safetensors=True, unet_config=pipe.unet.config,
        return_lora_metadata=True)
    alphas, metadata = alphas or {}, metadata or {}
    loaded = []
    with ExitStack() as undo:
        for part in PARTS:
            prefix = f"{part}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not own:
                continue
            model = getattr(pipe, part, None)
            if model is None:
                raise ValueError(f"{path} holds {part} LoRA keys but the pipeline has no {part}")
            convert = convert_unet_state_dict_to_peft if part == "unet" else convert_state_dict_to_peft
            own = convert(own)
            # kohya alphas come keyed like their (old-style) weights: convert those keys the same way
            part_alphas = {}
            for key, alpha in alphas.items():
                if key.startswith(prefix) and key.endswith(".alpha"):
                    weight_key = next(iter(convert({key[len(prefix):-len(".alpha")]: torch.zeros(1)})))
                    part_alphas[weight_key.rsplit(".lora_", 1)[0]] = alpha
            config, tensors = _lora_config_and_tensors(own, part_alphas, metadata, part, path)
            adapter_io.load_adapter_state(model, config, tensors, name, source=f"{path} ({part})")
            undo.callback(remove_adapter, model, name)
            loaded.append(part)
        undo.pop_all()  # everything loaded: keep it
    if not loaded:
        keys = sorted(state)[:3]
        raise ValueError(f"{path} holds no UNet or text-encoder LoRA keys (first keys: {keys}); is it a LoRA for "
                         "Stable Diffusion 1.x/2.x?")
    return loaded


def _lora_config_and_tensors(state: dict, alphas: dict, metadata: dict, part: str, source) -> tuple:
    """One LoRA config for a part's PEFT-keyed tensors, the scale alpha/r folded into B per module
    (``alphas``: module → alpha, from kohya files; else the saved LoraConfig's lora_alpha; else r)."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k or ".lora_B." in k})
    unknown = sorted(k for k in state if ".lora_A." not in k and ".lora_B." not in k)
    if unknown:
        raise ValueError(f"{source}: {part} keys boftvision cannot read: {unknown[:3]} (LoRA A/B weights only; "
                         "DoRA, LoHa, LoKr and bias terms are not supported)")
    ranks = {m: state[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"{source}: {part} LoRA ranks differ between modules ({sorted(set(ranks.values()))}); "
                         "boftvision's LoRAConfig has one rank per adapter")
    r = next(iter(ranks.values()))
    meta = {k[len(part) + 1:]: v for k, v in metadata.items() if k.startswith(f"{part}.")}  # the LoraConfig saved
    for option in ("use_dora", "use_rslora", "alpha_pattern", "rank_pattern"):
        if meta.get(option):
            raise ValueError(f"{source}: {part} LoRA saved with {option}={meta[option]!r}, which boftvision's LoRA "
                             "does not implement; load it with diffusers, or merge it there first")
    tensors = {}
    for m in modules:
        alpha = alphas.get(m, meta.get("lora_alpha") or r)
        tensors[f"{adapter_io.PREFIX}{m}.lora_A.weight"] = state[f"{m}.lora_A.weight"]
        tensors[f"{adapter_io.PREFIX}{m}.lora_B.weight"] = state[f"{m}.lora_B.weight"] * (float(alpha) / r)
    config = LoRAConfig(r=r, alpha=float(r), target_modules=modules)
    return config, tensors


def export_run(run_dir: str | Path, base: str | Path, diffusers_lora: bool = False,
               lycoris_file: str | Path | None = None, single_file: str | Path | None = None,
               merged: str | Path | None = None, **load_kwargs) -> list[Path]:
    """A finished run's exports, made from its saved adapter files on a fresh copy of the base pipeline
    (CPU, float32; ``load_kwargs`` as :func:`load_pipeline` takes them): diffusers' LoRA layout in
    ``run_dir``, a LyCORIS file, a merged single-file checkpoint, a merged pipeline folder. From the
    files rather than the training modules, so a sharded (FSDP) run exports what a single process does,
    and every export holds exactly what was saved. Returns the paths written."""
    from ...io.single_file import save_single_file

    if not (diffusers_lora or lycoris_file or single_file or merged):
        return []
    pipe = load_pipeline(base, **load_kwargs)
    attach_adapters(pipe, run_dir)
    written = []
    if diffusers_lora:
        written.append(save_diffusers_lora(pipe, run_dir))
    if lycoris_file:  # before the merged exports, which fold the adapters into the weights
        written.append(save_lycoris_file(pipe, lycoris_file))
    if single_file:
        written.append(save_single_file(pipe, single_file))
    if merged:
        export_merged(pipe, merged)
        written.append(Path(merged))
    return written


def export_merged(pipe, out_dir: str | Path) -> None:
    """Merge the active adapters into the weights and ``save_pretrained`` a plain pipeline (written
    whole: a temporary sibling, then a rename); ``StableDiffusionPipeline.from_pretrained`` loads it."""
    for part in PARTS:
        if getattr(pipe, part, None) is not None:
            setattr(pipe, part, merge_and_unload(getattr(pipe, part)))
    with atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)


def conditioning(encoded) -> tuple[torch.Tensor, dict | None]:
    """(context, SDXL's added_cond_kwargs or None) from a text encoder's output: a transformers output,
    ``(context,)``, or ``(context, added_cond_kwargs)`` (see ``sdxl.SDXLTextEncoder``)."""
    if isinstance(encoded, tuple) and len(encoded) > 1 and isinstance(encoded[1], dict):
        return encoded[0], encoded[1]
    return encoded[0], None


def denoising_loss(unet, vae, text_encoder, noise_scheduler, pixels: torch.Tensor | None, ids: torch.Tensor,
                   dtype: torch.dtype, control: torch.Tensor | None = None,
                   timesteps_as_class_labels: bool = False, latents: dict | None = None) -> torch.Tensor:
    """Per-example MSE of the UNet's noise (or v) prediction at random timesteps: the training loss of
    DreamBooth and of the control script. ``text_encoder``: the model, or any ``ids → (context,)`` — or
    ``(context, added_cond_kwargs)`` for SDXL's UNet (see ``sdxl.SDXLTextEncoder``); ``control``:
    features added after ``conv_in``; ``timesteps_as_class_labels``: diffusers'
    ``--class_labels_conditioning timesteps``; ``latents``: the VAE's distribution of the images, cached
    by :func:`cache_latents` (``pixels`` is then not needed)."""
    import torch.nn.functional as F

    if latents is None:
        with torch.no_grad():
            latents = vae_distribution(vae, pixels, dtype)
    std = latents["std"]  # a fresh sample each step, drawn as diffusers' latent_dist.sample() draws it
    latents = latents["mean"] + std * torch.randn(std.shape, dtype=std.dtype, device=std.device)
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    context, added = conditioning(text_encoder(ids))
    labels = t if timesteps_as_class_labels else None
    with control_signal(unet, control) if control is not None else nullcontext():
        pred = unet(noisy, t, context, class_labels=labels, added_cond_kwargs=added).sample
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def vae_distribution(vae, pixels: torch.Tensor, dtype: torch.dtype) -> dict:
    """The VAE's latent distribution of ``pixels``, scaled as the UNet sees latents: {"mean", "std"}."""
    dist = vae.encode(pixels.to(dtype)).latent_dist
    return {"mean": dist.mean * vae.config.scaling_factor, "std": dist.std * vae.config.scaling_factor}


@torch.no_grad()
def cache_latents(vae, loader, dtype: torch.dtype, device: torch.device | str) -> list[dict]:
    """diffusers' ``--cache_latents``: every batch of ``loader`` encoded once — the VAE's distribution of
    its images (on CPU), kept with its other fields in place of the pixels; training then samples from
    each distribution instead of running the VAE. The loader's order must be fixed (each cached batch
    keeps the crop and flip it was drawn with, as in diffusers)."""
    from tqdm.auto import tqdm

    batches = []
    for batch in tqdm(loader, desc="caching latents", leave=False):
        latents = vae_distribution(vae, batch["pixels"].to(device), dtype)
        batches.append({**{k: v for k, v in batch.items() if k != "pixels"},
                        "latents": {k: v.cpu() for k, v in latents.items()}})
    return batches


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
