"""Merged single-file checkpoints in the original Stable Diffusion layout (AUTOMATIC1111, ComfyUI):
diffusers' own ``from_single_file`` reads ours and draws the adapted pipeline's images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import boftvision as bv
from boftvision.integrations.diffusers import TEXT_ENCODER_PRESETS, UNET_PRESETS, load_pipeline, save_single_file


def images(pipe) -> np.ndarray:
    return pipe("a photo", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                height=32, width=32).images


def from_single_file(path, config):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


ADAPTERS = {  # input-side BOFT (what LyCORIS files cannot hold) and LoRA, on UNet convs and attention
    "boft": bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False),
    "lora": bv.LoRAConfig(r=4, init_weights=False),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_single_file_loads_in_diffusers_with_the_adapted_images(tiny_sd, tmp_path, kind):
    import dataclasses

    torch.manual_seed(0)
    pipe = load_pipeline(tiny_sd)
    bv.add_adapter(pipe.unet, dataclasses.replace(ADAPTERS[kind], target_modules=UNET_PRESETS["all"]))
    bv.add_adapter(pipe.text_encoder, dataclasses.replace(ADAPTERS[kind], target_modules=TEXT_ENCODER_PRESETS["all"]))
    expected = images(pipe)
    assert np.abs(expected - images(load_pipeline(tiny_sd))).max() > 1e-2  # the adapters change the images
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    assert not bv.inject.adapter_configs(pipe.unet)  # merged into the weights

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    got = images(from_single_file(path, tiny_sd))
    assert np.abs(got - expected).max() <= 1e-4


def test_single_file_refuses_what_it_cannot_place(tiny_sd, tmp_path):
    pipe = load_pipeline(tiny_sd)
    pipe.unet.register_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no original-layout name for 'extra.weight'"):
        save_single_file(pipe, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(load_pipeline(tiny_sd), tmp_path / "model.ckpt")
