"""Stable Diffusion (diffusers), split by concern: ``pipeline`` (presets, loading with adapters, loss,
schedule, merged export), ``control`` (the control-signal encoder and hook), ``tiny`` (the embedded
tiny pipeline's architecture)."""
from ...io.single_file import save_single_file
from .control import ControlEncoder, control_signal
from .pipeline import (
    DIFFUSERS_LORA_NAME,
    EMBEDDED,
    EMBEDDED_ADAPTER,
    EMBEDDED_CONTROL,
    TEXT_ENCODER_PRESETS,
    UNET_ATTENTION,
    UNET_PRESETS,
    adapter_parts,
    attach_adapters,
    base_model_for,
    cache_latents,
    denoising_loss,
    diffusers_lora_file,
    export_merged,
    export_run,
    frozen_pipeline,
    image_grid,
    load_diffusers_lora,
    load_lycoris_file,
    load_pipeline,
    lr_scheduler_from_args,
    read_model_card,
    recorded_base_model,
    save_diffusers_lora,
    save_lycoris_file,
)
from .tiny import TINY, build_clip_tokenizer, bytes_to_unicode, pipeline_from_components, tiny_components

__all__ = ["ControlEncoder", "control_signal", "EMBEDDED", "EMBEDDED_ADAPTER", "EMBEDDED_CONTROL",
           "TEXT_ENCODER_PRESETS", "UNET_ATTENTION", "UNET_PRESETS", "adapter_parts", "attach_adapters",
           "cache_latents", "denoising_loss", "export_merged", "export_run", "frozen_pipeline", "image_grid",
           "load_pipeline",
           "lr_scheduler_from_args", "read_model_card", "DIFFUSERS_LORA_NAME", "diffusers_lora_file",
           "load_diffusers_lora", "save_diffusers_lora", "load_lycoris_file", "save_lycoris_file", "save_single_file",
           "recorded_base_model", "base_model_for", "TINY", "build_clip_tokenizer", "bytes_to_unicode",
           "pipeline_from_components", "tiny_components"]
