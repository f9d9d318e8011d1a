"""LyCORIS / kohya files (ComfyUI, AUTOMATIC1111, kohya): ours load in lycoris-lora with our outputs, and
networks lycoris-lora builds load here with its outputs — both checked by running lycoris-lora in-process
on a tiny diffusers UNet and CLIP text encoder."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import LYCORIS_PRESET, apply_lycoris_file

import boftvision as bv
from boftvision.inject import adapter_configs
from boftvision.integrations.diffusers import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    attach_adapters,
    load_pipeline,
    save_lycoris_file,
)

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is a dev dependency")

def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet noise prediction, text-encoder states) on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (2, 8), generator=g)
    latents = torch.randn(2, pipe.unet.config.in_channels, 16, 16, generator=g)
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=states).sample
    return noise, states


@pytest.fixture
def lycoris_preset(tmp_path):
    """The conftest preset as the TOML file lycoris-lora's create_network reads."""
    lines = [f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}" for k, v in LYCORIS_PRESET.items()]
    (tmp_path / "preset.toml").write_text("\n".join(lines) + "\n")
    lycoris_kohya.LycorisNetworkKohya.apply_preset(LYCORIS_PRESET)
    return tmp_path / "preset.toml"


def lycoris_applied(tiny_sd, path):
    """A fresh pipeline with lycoris-lora's network from ``path`` applied (kohya's loader)."""
    pipe = load_pipeline(tiny_sd)
    apply_lycoris_file(pipe, path)
    return pipe


CONFIGS = {
    "lora": bv.LoRAConfig(r=4, alpha=2.0, init_weights=False),
    "vblora": bv.VBLoRAConfig(r=4, vector_length=8, num_vectors=32, init_logits_std=1.0,
                              init_vector_bank_bound=0.2),
    "oft": bv.OFTConfig(block_size=4, use_cayley_neumann=False, orientation="output", init_weights=False),
    "boft_m2": bv.BOFTConfig(block_size=4, n_butterfly_factor=2, orientation="output", init_weights=False),
    "boft_full": bv.BOFTConfig(block_size=4, n_butterfly_factor=0, orientation="output", init_weights=False),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_our_export_loads_in_lycoris_with_our_outputs(tiny_sd, tmp_path, kind):
    import dataclasses

    torch.manual_seed(0)
    pipe = load_pipeline(tiny_sd)
    base = outputs(pipe)
    bv.add_adapter(pipe.unet, dataclasses.replace(CONFIGS[kind], target_modules=UNET_PRESETS["all"]))
    bv.add_adapter(pipe.text_encoder, dataclasses.replace(CONFIGS[kind], target_modules=TEXT_ENCODER_PRESETS["all"]))
    ours = outputs(pipe)
    assert min((o - b).abs().max() for o, b in zip(ours, base)) > 1e-3  # the adapters do something
    path = save_lycoris_file(pipe, tmp_path / "out.safetensors")

    theirs = outputs(lycoris_applied(tiny_sd, path))
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(t, o, atol=1e-5, rtol=1e-5)

    back = load_pipeline(tiny_sd)  # and here again: the file round-trips
    assert attach_adapters(back, path) == ["unet", "text_encoder"]
    for o, t in zip(ours, outputs(back)):
        torch.testing.assert_close(t, o, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo,extra", [("lora", {}), ("locon", {"conv_dim": 4, "conv_alpha": 2}),
                                        ("diag-oft", {}), ("diag-oft", {"rescaled": True, "constraint": 1e-3}),
                                        ("boft", {"rescaled": True}), ("boft", {"constraint": 1e-3})])
def test_network_lycoris_builds_loads_here_with_its_outputs(tiny_sd, tmp_path, lycoris_preset, algo, extra):
    torch.manual_seed(0)
    pipe = load_pipeline(tiny_sd)
    network = lycoris_kohya.create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, algo=algo,
                                           preset=str(lycoris_preset), **extra)
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(1.0 if p.dim() >= 2 and p.shape[1:].numel() == 1 and p.shape[0] > 1 else 0.0, 0.1)
    network.save_weights(str(tmp_path / "net.safetensors"), torch.float32, None)
    theirs = outputs(pipe)

    ours = load_pipeline(tiny_sd)
    base = outputs(ours)
    assert attach_adapters(ours, tmp_path / "net.safetensors") == ["unet", "text_encoder"]
    got = outputs(ours)
    assert min((o - b).abs().max() for o, b in zip(got, base)) > 1e-3
    for o, t in zip(got, theirs):
        torch.testing.assert_close(o, t, atol=1e-5, rtol=1e-5)


def test_input_orientation_is_refused_with_the_fix(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    bv.add_adapter(model, bv.BOFTConfig(block_size=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="orientation='output'.*single-file"):
        bv.save_adapter(model, tmp_path / "x.safetensors", format="lycoris", prefix="lora_unet")
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_files_get_clear_errors_and_leave_the_model_alone(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    pipe = load_pipeline(tiny_sd)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    cases = {
        "names": ({"lora_unet_no_such_module.oft_blocks": torch.zeros(8, 4, 4)}, "0 of 1 lora_unet modules match"),
        "shape": ({f"{key}.oft_blocks": torch.zeros(4, 4, 4)}, "4 blocks of 4 in the file, but this layer has 32"),
        "keys": ({f"{key}.oft_blocks": torch.zeros(8, 4, 4), f"{key}.extra": torch.zeros(1)}, "unknown tensors"),
        "loha": ({f"{key}.hada_w1_a": torch.zeros(32, 4), f"{key}.hada_w1_b": torch.zeros(4, 32)}, "LoHa"),
        "nan": ({f"{key}.oft_blocks": torch.full((8, 4, 4), float("nan"))}, "non-finite"),
    }
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            attach_adapters(pipe, tmp_path / f"{name}.safetensors")
        assert not adapter_configs(pipe.unet) and not adapter_configs(pipe.text_encoder)
    # a file with a good UNet part and a bad text-encoder part: nothing stays loaded
    mixed = {f"{key}.oft_blocks": torch.zeros(8, 4, 4), "lora_te_no_such.oft_blocks": torch.zeros(8, 4, 4)}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="lora_te modules match"):
        attach_adapters(pipe, tmp_path / "mixed.safetensors")
    assert not adapter_configs(pipe.unet)
