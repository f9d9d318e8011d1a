"""Stable Diffusion XL on a tiny pipeline built here from configs (UNet with "text_time" added
conditions, CLIPTextModel + CLIPTextModelWithProjection): DreamBooth trains every adapter on the UNet and
both text encoders, resumes, writes a LoRA diffusers' SDXL pipeline loads; generation and the butterfly
interpolation path run on it."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import boftvision as bv
from boftvision.adapters import METHODS
from boftvision.data.shapes import INSTANCE_PROMPT, WORDS
from boftvision.generate import generate, interpolation_path
from boftvision.integrations.diffusers import attach_adapters, denoising_loss, load_pipeline
from boftvision.integrations.diffusers.sdxl import SDXLTextEncoder, SDXLTokenizers, is_sdxl, tiny_sdxl_components
from boftvision.integrations.diffusers.tiny import build_clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import train_dreambooth_boft  # noqa: E402
from conftest import SD_ADAPTER_SIZES, write_instance_images  # noqa: E402


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("sdxl")
    StableDiffusionXLPipeline(**tiny_sdxl_components(build_clip_tokenizer(WORDS, 16))).save_pretrained(
        str(root / "model"))
    write_instance_images(root / "instance", 3)
    return root


def args(root, out, *extra):
    return ["--pretrained_model_name_or_path", str(root / "model"), "--instance_data_dir", str(root / "instance"),
            "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out), "--learning_rate", "1e-2",
            "--train_batch_size", "3", "--seed", "0", "--train_text_encoder", *SD_ADAPTER_SIZES, *extra]


def images(pipe) -> np.ndarray:
    return np.stack([np.asarray(i, np.float32) for i in generate(pipe, INSTANCE_PROMPT, seed=0, steps=2)])


def fixed_loss(pipe, root, draws: int = 16) -> float:
    """The training loss on the instance images, averaged over ``draws`` fixed seeds (timesteps, noise and
    latent samples drawn alike for every model): a paired measure, unlike the per-step losses, which the
    random timesteps dominate on this untrained tiny SDXL."""
    from diffusers import DDPMScheduler

    tokenizer = SDXLTokenizers(pipe.tokenizer, pipe.tokenizer_2)
    ids = tokenizer(INSTANCE_PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f), np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for f in sorted((root / "instance").glob("*.png"))])
    encode = SDXLTextEncoder(pipe.text_encoder, pipe.text_encoder_2, 32)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    losses = []
    with torch.no_grad():
        for seed in range(draws):
            torch.manual_seed(seed)
            losses.append(denoising_loss(pipe.unet, pipe.vae, encode, scheduler, pixels,
                                         ids.expand(len(pixels), *ids.shape[1:]), torch.float32).mean().item())
    return float(np.mean(losses))


@pytest.mark.parametrize("adapter", list(METHODS))
def test_sdxl_dreambooth_trains_both_text_encoders_and_reloads(sdxl, tmp_path, adapter):
    """20 steps lower the paired loss by ≥ 1.5 % (measured: LoRA 9 %, VB-LoRA 5 %, BOFT and OFT 3 %)."""
    train_dreambooth_boft.main(args(sdxl, tmp_path, "--adapter", adapter, "--max_train_steps", "20"))
    assert {p.name for p in tmp_path.iterdir()} >= {"unet", "text_encoder", "text_encoder_2"}
    pipe = load_pipeline(sdxl / "model")
    assert is_sdxl(pipe)
    base, base_loss = images(pipe), fixed_loss(pipe, sdxl)
    assert attach_adapters(pipe, tmp_path) == ["unet", "text_encoder", "text_encoder_2"]
    assert fixed_loss(pipe, sdxl) < 0.985 * base_loss
    assert np.abs(images(pipe) - base).max() > 0  # the adapters reached the images


def test_sdxl_resume_continues_exactly(sdxl, tmp_path):
    full = train_dreambooth_boft.main(args(sdxl, tmp_path / "full", "--max_train_steps", "4",
                                           "--checkpointing_steps", "2"))
    train_dreambooth_boft.main(args(sdxl, tmp_path / "cut", "--max_train_steps", "2", "--checkpointing_steps", "2"))
    resumed = train_dreambooth_boft.main(args(sdxl, tmp_path / "cut", "--max_train_steps", "4",
                                              "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
    assert resumed["losses"][-2:] == pytest.approx(full["losses"][-2:], abs=1e-5)


def test_sdxl_lora_loads_in_diffusers_with_our_images(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    train_dreambooth_boft.main(args(sdxl, tmp_path, "--adapter", "lora", "--max_train_steps", "3",
                                    "--lora_alpha", "4"))
    ours = load_pipeline(sdxl / "model")
    attach_adapters(ours, tmp_path)
    theirs = StableDiffusionXLPipeline.from_pretrained(str(sdxl / "model"))
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(tmp_path))
    assert np.abs(images(theirs) - images(ours)).max() <= 1e-4 * 255
    assert np.abs(images(ours) - images(load_pipeline(sdxl / "model"))).max() > 0


def test_sdxl_interpolation_endpoints(sdxl):
    pipe = load_pipeline(sdxl / "model")
    base = images(pipe)
    torch.manual_seed(0)
    bv.add_adapter(pipe.unet, bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    tuned = images(pipe)
    path = interpolation_path(pipe, INSTANCE_PROMPT, seed=0, steps=2)
    assert [label for label, _ in path] == ["fine-tuned", "1/2 -> I", "2/2 -> I", "base"]
    assert np.array_equal(np.asarray(path[0][1], np.float32), tuned[0])
    assert np.array_equal(np.asarray(path[-1][1], np.float32), base[0])
    assert np.abs(tuned - base).max() > 0


def test_sd1_and_sdxl_adapters_do_not_mix(sdxl, tiny_sd, tmp_path):
    train_dreambooth_boft.main(args(sdxl, tmp_path / "xl", "--adapter", "lora", "--max_train_steps", "1"))
    with pytest.raises(ValueError, match="trained on an SDXL pipeline, and this one is SD 1.x/2.x"):
        attach_adapters(load_pipeline(tiny_sd), tmp_path / "xl")
    sd1 = load_pipeline(tiny_sd)
    bv.add_adapter(sd1.unet, bv.LoRAConfig(r=2, target_modules=["to_q"]))
    bv.save_adapter(sd1.unet, tmp_path / "sd1" / "unet")
    pipe = load_pipeline(sdxl / "model")
    with pytest.raises(ValueError, match="this is an SDXL pipeline: was the adapter trained on the other kind"):
        attach_adapters(pipe, tmp_path / "sd1")
    assert not bv.inject.adapter_configs(pipe.unet)


def test_sdxl_flags_of_diffusers_script(sdxl, tmp_path):
    """--pretrained_vae_model_name_or_path replaces the VAE; --crops_coords_top_left_h/w enter the time ids
    (original size, crop top-left, target size), as diffusers' SDXL script builds them."""
    from boftvision.integrations.diffusers.sdxl import SDXLTextEncoder, SDXLTokenizers

    vae = load_pipeline(sdxl / "model").vae
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2)
    vae.save_pretrained(str(tmp_path / "vae"))
    pipe = load_pipeline(sdxl / "model", vae_name_or_path=str(tmp_path / "vae"))
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    ids = SDXLTokenizers(pipe.tokenizer, pipe.tokenizer_2)(INSTANCE_PROMPT, padding="max_length", max_length=16,
                                                         truncation=True, return_tensors="pt").input_ids
    _, added = SDXLTextEncoder(pipe.text_encoder, pipe.text_encoder_2, 32, (4, 2))(ids)
    assert added["time_ids"].tolist() == [[32.0, 32.0, 4.0, 2.0, 32.0, 32.0]]
    result = train_dreambooth_boft.main(args(sdxl, tmp_path / "out", "--max_train_steps", "2",
                                             "--pretrained_vae_model_name_or_path", str(tmp_path / "vae"),
                                             "--crops_coords_top_left_h", "4", "--crops_coords_top_left_w", "2"))
    assert result["steps"] == 2


def test_sdxl_control_training_loss_falls(sdxl, tmp_path):
    import train_controlnet_boft

    from boftvision.data.controlnet import write_triplets
    from boftvision.data.shapes import control_example

    rng = np.random.default_rng(0)
    write_triplets(tmp_path / "train", [control_example(rng, 32) for _ in range(4)])
    result = train_controlnet_boft.main(["--pretrained_model_name_or_path", str(sdxl / "model"), "--train_data_dir",
                                         str(tmp_path / "train"), "--output_dir", str(tmp_path / "out"),
                                         "--learning_rate", "1e-2", "--train_batch_size", "4", "--seed", "0",
                                         "--adapter", "boft", "--max_train_steps", "20", *SD_ADAPTER_SIZES])
    losses = result["losses"]
    assert statistics.mean(losses[-5:]) < 0.95 * statistics.mean(losses[:5])
    assert (tmp_path / "out" / "unet" / "adapter_model.safetensors").is_file()


def test_sdxl_memory_options_give_the_same_training(sdxl, tmp_path):
    """--gradient_checkpointing (UNet and both text encoders) trains exactly as without it; bf16 autocast
    keeps the adapters fp32 and the losses finite and close."""
    plain = train_dreambooth_boft.main(args(sdxl, tmp_path / "plain", "--max_train_steps", "3"))
    checkpointed = train_dreambooth_boft.main(args(sdxl, tmp_path / "gc", "--max_train_steps", "3",
                                                   "--gradient_checkpointing"))
    assert checkpointed["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # another mixed precision in this process
    half = train_dreambooth_boft.main(args(sdxl, tmp_path / "bf16", "--max_train_steps", "3",
                                           "--mixed_precision", "bf16", "--gradient_checkpointing"))
    assert all(np.isfinite(half["losses"])) and half["losses"][0] == pytest.approx(plain["losses"][0], rel=0.05)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert {t.dtype for t in bv.io.read_adapter(tmp_path / "bf16" / part)[1].values()} == {torch.float32}


def test_sdxl_cached_latents_train_with_one_vae_pass(sdxl, tmp_path, monkeypatch):
    """--cache_latents: the VAE encodes once, before training (20 steps, one batch per epoch), and the
    training still lowers the paired loss."""
    from diffusers import AutoencoderKL

    encoded = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: encoded.append(1) or encode(self, *a, **k))
    train_dreambooth_boft.main(args(sdxl, tmp_path, "--adapter", "lora", "--max_train_steps", "20",
                                    "--cache_latents"))
    assert len(encoded) == 1
    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    pipe = load_pipeline(sdxl / "model")
    base_loss = fixed_loss(pipe, sdxl)
    attach_adapters(pipe, tmp_path)
    assert fixed_loss(pipe, sdxl) < 0.985 * base_loss


def test_sdxl_both_text_encoders_under_ddp_and_fsdp_train_alike(sdxl, tmp_path):
    """Two processes on the tiny SDXL with both text encoders adapted: DDP runs (the first encoder's last
    layer gives no gradient — SDXL reads its penultimate layer — so DDP must expect unused parameters), and
    accelerate's FSDP2 (UNet and both encoders prepared as one) gives DDP's adapters (dropout and weight
    decay off: FSDP hands unused parameters a zero gradient where DDP leaves none, which decay would move)."""
    import json

    from conftest import accelerate_launch
    from safetensors.torch import load_file

    def run(out, *engine):
        accelerate_launch("train_dreambooth_boft.py", args(
            sdxl, out, "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "0.05",
            "--adam_epsilon", "1", "--adam_weight_decay", "0", "--boft_dropout", "0"), *engine)
        return {part: load_file(out / part / "adapter_model.safetensors")
                for part in ("unet", "text_encoder", "text_encoder_2")}

    expected = run(tmp_path / "ddp")
    sharded = run(tmp_path / "fsdp2", "fsdp2", "BasicTransformerBlock,ResnetBlock2D,CLIPEncoderLayer")
    for part, tensors in expected.items():
        assert sharded[part].keys() == tensors.keys()
        assert all((sharded[part][k] - v).abs().max() <= 1e-5 for k, v in tensors.items()), part
    assert json.loads((tmp_path / "fsdp2" / "results.json").read_text())["processes"] == 2
