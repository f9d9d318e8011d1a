"""Merged single-file Stable Diffusion checkpoints: the original (latent-diffusion) layout that
AUTOMATIC1111/Forge, ComfyUI and ``StableDiffusionPipeline.from_single_file`` load — for any adapter,
input-oriented OFT/BOFT included, because the adapters are merged into the weights first.

One ``.safetensors`` with ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (the CLIP text encoder of SD 1.x). Names are derived from each
model's config (number of levels, layers per block), the inverse of the renaming diffusers applies when
it reads such a file; a weight this mapping does not place is an error, never dropped.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_file
from ..inject import adapter_configs, merge_and_unload

UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]


def unet_prefixes(config, keys) -> list[tuple[str, str, list]]:
    """(diffusers prefix, original prefix, renames inside) for a ``UNet2DConditionModel``."""
    per_block, levels = config["layers_per_block"], len(config["block_out_channels"])
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block={per_block!r} per level has no original-layout equivalent here")
    step = per_block + 1
    out = [("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
           ("conv_in.", "input_blocks.0.0.", []), ("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", []),
           ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
           ("mid_block.attentions.0.", "middle_block.1.", []),
           ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    for i in range(levels):
        for j in range(per_block):
            k = 1 + i * step + j
            out += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", [])]
        if i < levels - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * step}.0.op.", []))
        for j in range(step):
            out += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * step + j}.0.", UNET_RESNET),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * step + j}.1.", [])]
        if i < levels - 1:
            attention = any(key.startswith(f"up_blocks.{i}.attentions.") for key in keys)
            at = f"output_blocks.{i * step + per_block}.{2 if attention else 1}."  # after the attention, if any
            out.append((f"up_blocks.{i}.upsamplers.0.", at, []))
    return out


def vae_prefixes(config) -> list[tuple[str, str, list]]:
    """(diffusers prefix, original prefix, renames inside) for an ``AutoencoderKL``."""
    per_block, levels = config["layers_per_block"], len(config["down_block_types"])
    out = [("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.conv_in.", f"{part}.conv_in.", []), (f"{part}.conv_out.", f"{part}.conv_out.", []),
                (f"{part}.conv_norm_out.", f"{part}.norm_out.", []),
                (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(levels):
        out += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
                for j in range(per_block)]
        up = levels - 1 - i  # the decoder's levels are numbered the other way round
        out += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET)
                for j in range(per_block + 1)]
        if i < levels - 1:
            out += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []),
                    (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", [])]
    return out


def rename(state: dict[str, torch.Tensor], prefixes, what: str) -> dict[str, torch.Tensor]:
    """Move every key to its original-layout name (the longest matching prefix wins)."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key, tensor in state.items():
        match = next((p for p in prefixes if key.startswith(p[0])), None)
        if match is None:
            raise ValueError(f"{what}: no original-layout name for {key!r}; single-file export covers the Stable "
                             "Diffusion 1.x/2.x architecture")
        new, old, inner = match
        rest = key[len(new):]
        for ours, theirs in inner:
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
        if inner is VAE_ATTENTION and rest.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention is 1×1 convolutions
        out[old + rest] = tensor
    return out


def single_file_state(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three models' weights under the original Stable Diffusion names (no adapters: merge first)."""
    for part, model in (("unet", unet), ("text_encoder", text_encoder)):
        if adapter_configs(model):
            raise ValueError(f"the {part} still holds adapters; merge them first (merge_and_unload)")
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise ValueError(f"text encoder {type(text_encoder).__name__}: single-file export writes SD 1.x's CLIP "
                         "text encoder (CLIPTextModel)")
    state = {f"model.diffusion_model.{k}": v for k, v in
             rename(unet.state_dict(), unet_prefixes(unet.config, list(unet.state_dict())), "UNet").items()}
    state.update({f"first_stage_model.{k}": v for k, v in rename(vae.state_dict(), vae_prefixes(vae.config),
                                                                  "VAE").items()})
    text = text_encoder.state_dict()  # SD's names are transformers' CLIPTextModel's, under text_model.
    state.update({f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v
                  for k, v in text.items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_single_file(pipe, path: str | os.PathLike) -> Path:
    """Merge the pipeline's active adapters (UNet, text encoder) and write one original-layout Stable
    Diffusion checkpoint at ``path`` (``.safetensors``), whole or not at all. The pipeline's models are
    replaced by their merged, adapter-free versions."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a single-file checkpoint is written as .safetensors; got {str(path)!r}")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("single-file export covers Stable Diffusion 1.x/2.x pipelines (one text encoder); export "
                         "SDXL with --save_merged (a diffusers folder)")
    pipe.unet = merge_and_unload(pipe.unet)
    pipe.text_encoder = merge_and_unload(pipe.text_encoder)
    state = single_file_state(pipe.unet, pipe.vae, pipe.text_encoder)
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path
