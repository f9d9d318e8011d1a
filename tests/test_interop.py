"""What we write loads where users run models, checked by running those libraries in-process:
diffusers' load_lora_weights, stock (unpatched) PEFT and transformers' load_adapter, diffusers'
from_pretrained on merged exports; and diffusers LoRA files load here as diffusers loads them."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import LINEAR, TinyNet

import boftvision as bv
from boftvision.data.shapes import INSTANCE_PROMPT
from boftvision.generate import initial_noise
from boftvision.integrations.diffusers import attach_adapters, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import train_dreambooth_boft  # noqa: E402


def dreambooth(tiny_sd, instance, out, *extra):
    return train_dreambooth_boft.main([
        "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(instance),
        "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out), "--max_train_steps", "3",
        "--learning_rate", "5e-2", "--boft_block_size", "4", "--lora_r", "4", "--lora_alpha", "8", *extra])


def pixels(pipe, seed: int = 1):
    """One image as floats in [0, 1], from the seed's noise, 3 denoising steps."""
    pipe.set_progress_bar_config(disable=True)
    return pipe([INSTANCE_PROMPT], latents=initial_noise(pipe, seed, 1), num_inference_steps=3,
                output_type="np").images[0]


def unet_output(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), context).sample


def text_output(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a photo of sks shape"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_lora_dreambooth_output_loads_in_diffusers(tiny_sd, instance, tmp_path):
    out = tmp_path / "run"
    dreambooth(tiny_sd, instance, out, "--adapter", "lora", "--train_text_encoder")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    ours = load_pipeline(tiny_sd)
    attach_adapters(ours, out)
    theirs = load_pipeline(tiny_sd)
    base = unet_output(theirs)
    theirs.load_lora_weights(str(out))  # diffusers' own loader, on the output_dir as users pass it
    assert (unet_output(ours) - base).abs().max() > 1e-3  # the LoRA changes the model …
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), atol=1e-5, rtol=1e-5)  # … the same way
    torch.testing.assert_close(text_output(theirs), text_output(ours), atol=1e-5, rtol=1e-5)
    assert abs(pixels(ours, 3) - pixels(theirs, 3)).max() <= 1e-4  # the same image
    config = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_sd)


def test_diffusers_lora_file_loads_here_as_diffusers_loads_it(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    source = load_pipeline(tiny_sd)
    lora = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    source.unet.add_adapter(lora)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(source.unet),
                                              unet_lora_adapter_metadata=lora.to_dict())
    theirs = load_pipeline(tiny_sd)
    theirs.load_lora_weights(str(tmp_path))
    ours = load_pipeline(tiny_sd)
    assert attach_adapters(ours, tmp_path / "pytorch_lora_weights.safetensors") == ["unet"]
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=1e-5, rtol=1e-5)
    assert (unet_output(ours) - unet_output(load_pipeline(tiny_sd))).abs().max() > 1e-3


def test_kohya_lora_file_loads_here_as_diffusers_loads_it(tiny_sd, tmp_path):
    """The kohya / AUTOMATIC1111 layout (lora_unet_<path with underscores>.lora_down/lora_up/alpha), as
    diffusers converts it: equal UNet outputs, alpha/r applied."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = load_pipeline(tiny_sd)
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    kohya = {}
    for key, tensor in get_peft_model_state_dict(source.unet).items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(2.0)  # scale alpha/r = 0.5
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    theirs = load_pipeline(tiny_sd)
    theirs.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    ours = load_pipeline(tiny_sd)
    assert attach_adapters(ours, tmp_path / "kohya.safetensors") == ["unet"]
    assert (unet_output(ours) - unet_output(load_pipeline(tiny_sd))).abs().max() > 1e-4
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=1e-5, rtol=1e-5)


def test_diffusers_lora_bad_input_names_the_problem(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    pipe = load_pipeline(tiny_sd)
    save_file({"unet.nonexistent.block.lora_A.weight": torch.zeros(4, 8),
               "unet.nonexistent.block.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="nonexistent.block.*matches no module"):
        attach_adapters(pipe, tmp_path / "other.safetensors")
    assert not bv.inject.adapter_configs(pipe.unet)
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(8)},
              str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match="lora_magnitude_vector|no UNet or text-encoder LoRA"):
        attach_adapters(pipe, tmp_path / "dora.safetensors")


def test_boft_with_several_factors_exports_for_stock_peft(tmp_path):
    """Unpatched PEFT on CPU builds BOFT with one factor only; the export is that adapter, equal to ours."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = TinyNet()
    model = bv.add_adapter(copy.deepcopy(base), bv.BOFTConfig(block_size=4, n_butterfly_factor=3, init_weights=False,
                                                              target_modules=LINEAR))
    bv.save_adapter(model, tmp_path, peft_compatible=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["boft_n_butterfly_factor"] == 1 and config["boft_block_size"] == 16
    x = torch.randn(3, 5, 32)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        img = torch.randn(1, 8, 6, 6)
        torch.testing.assert_close(theirs(x, img)[0], model(x, img)[0], atol=1e-5, rtol=1e-5)
    again = bv.load_adapter(copy.deepcopy(base), tmp_path)  # and it still loads here, equal
    with torch.no_grad():
        torch.testing.assert_close(again(x, img)[0], model(x, img)[0], atol=1e-5, rtol=1e-5)


def test_boft_export_loads_in_transformers_load_adapter(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    base = BertModel(config).eval()
    model = bv.add_adapter(copy.deepcopy(base), bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False,
                                                              target_modules=["query", "value"]))
    bv.save_adapter(model, tmp_path, peft_compatible=True)
    theirs = copy.deepcopy(base)
    theirs.load_adapter(str(tmp_path))
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_a_rotation_without_a_one_factor_form_is_refused_by_layer(tmp_path, monkeypatch):
    model = bv.add_adapter(TinyNet(), bv.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=["fc1"]))
    adapter = model.fc1.adapters["default"]
    minus_identity = -torch.eye(4).expand(2, 8, 4, 4).clone()  # factor 0 = −I: R has the eigenvalue −1
    minus_identity[1] = torch.eye(4)
    monkeypatch.setattr(adapter, "orthogonal_blocks", lambda: minus_identity)
    with pytest.raises(ValueError, match=r"layer 'fc1'.*eigenvalue near −1"):
        bv.save_adapter(model, tmp_path, peft_compatible=True)
    assert not tmp_path.joinpath("adapter_config.json").exists()


def test_merged_export_loads_in_diffusers_with_the_same_images(tiny_sd, instance, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    dreambooth(tiny_sd, instance, out, "--adapter", "boft", "--train_text_encoder", "--save_merged")
    adapted = load_pipeline(tiny_sd)
    attach_adapters(adapted, out)
    merged = StableDiffusionPipeline.from_pretrained(str(out / "merged"))
    a = pixels(adapted)
    assert abs(a - pixels(merged)).max() <= 1e-4
    assert abs(a - pixels(load_pipeline(tiny_sd))).max() > 1e-3

    from boftvision import generate as generate_module

    generate_module.main(["--model", str(tiny_sd), "--adapter", str(out), "--export", str(tmp_path / "exported")])
    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"))
    assert abs(a - pixels(exported)).max() <= 1e-4


def test_save_merged_uses_the_models_own_save_pretrained(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["query"], init_weights=False))
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    bv.save_merged(model, tmp_path / "merged")
    reloaded = BertModel.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_adapter_config_records_the_base_model(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    model = BertModel.from_pretrained(str(tmp_path / "bert"))
    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["query"]))
    bv.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "bert")
