"""Bad input gets a clear error that names the fix, and leaves the model as it was."""
import copy

import pytest
import torch
from conftest import CONFIGS, LINEAR, TinyNet

import boftvision as bv
from boftvision.adapters import AdaptedLayer


def snapshot(model):
    return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    modules, state = snap
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config,match", [
    (bv.BOFTConfig(block_size=12, target_modules=LINEAR),
     r"layer 'fc1' \(Linear, in_features=32, out_features=64\): block size 12 does not divide width 32; "
     r"try block_size=\d+"),
    (bv.OFTConfig(block_num=5, target_modules=LINEAR), r"layer 'fc1'.*block_num 5 does not divide width 32"),
    (bv.BOFTConfig(block_size=8, n_butterfly_factor=4, target_modules=LINEAR),
     r"layer 'fc1'.*n_butterfly_factor=4 with block size 8 needs width divisible by 8·2\^3 = 64.*"
     r"n_butterfly_factor ≤ 3"),
    (bv.VBLoRAConfig(vector_length=24, num_vectors=8, target_modules=LINEAR),
     r"layer 'fc1'.*vector_length 24 does not divide its input width 32.*e\.g\. 16"),
    (bv.LoRAConfig(target_modules=["no_such_layer"]), r"matches no module of TinyNet.*'fc1'"),
    (bv.LoRAConfig(target_modules=r".*attn.*"), r"matches no module"),
    (bv.LoRAConfig(target_modules=None), r"target_modules is empty"),
])
def test_bad_layer_settings_name_the_fix_and_change_nothing(net, config, match):
    snap = snapshot(net)
    with pytest.raises(ValueError, match=match):
        bv.add_adapter(net, config)
    assert_unchanged(net, snap)
    assert not bv.inject.adapter_configs(net)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=8, block_num=4), "exactly one of block_size or block_num"),
    (dict(block_size=3, n_butterfly_factor=2), "block_size must be even"),
    (dict(block_size=4, n_butterfly_factor=-1), r"n_butterfly_factor must be an int in \[0, 32\]"),
    (dict(block_size=4, dropout=1.5), r"dropout must be a number in \[0, 1\)"),
])
def test_bad_config_values_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bv.BOFTConfig(**kwargs)


def test_vblora_topk_larger_than_bank():
    with pytest.raises(ValueError, match="topk=5 exceeds num_vectors=4"):
        bv.VBLoRAConfig(num_vectors=4, topk=5)


def test_unsupported_module_type(net):
    with pytest.raises((TypeError, ValueError), match="adapts nn.Linear, nn.Conv2d and transformers. Conv1D"):
        bv.add_adapter(torch.nn.Sequential(torch.nn.LayerNorm(4)), bv.LoRAConfig(target_modules=["0"]))


def test_adding_an_existing_name(net):
    bv.add_adapter(net, CONFIGS["lora"](LINEAR))
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        bv.add_adapter(net, CONFIGS["boft"](LINEAR))


def test_adapter_file_for_another_model(tmp_path):
    small = bv.add_adapter(TinyNet(), bv.BOFTConfig(block_size=4, target_modules=LINEAR))
    bv.save_adapter(small, tmp_path)

    class Wider(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(48, 64)
            self.fc2 = torch.nn.Linear(64, 32)

    other = Wider()
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"fc1\.boft_R has shape \(1, 8, 4, 4\) in the file but \(1, 12, 4, 4\) here"):
        bv.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)

    renamed = torch.nn.Sequential()
    renamed.add_module("proj", torch.nn.Linear(32, 64))
    renamed.add_module("fc1", torch.nn.Linear(32, 64))
    renamed.add_module("fc2", torch.nn.Linear(64, 32))
    bv.load_adapter(renamed, tmp_path)  # same names and shapes: fine
    lacking = torch.nn.Sequential()
    lacking.add_module("fc1", torch.nn.Linear(32, 64))
    lacking.add_module("head", torch.nn.Linear(64, 32))
    snap = snapshot(lacking)
    with pytest.raises(ValueError, match="matches no module|keys for modules it lacks"):
        bv.load_adapter(lacking, tmp_path)
    assert_unchanged(lacking, snap)


def test_truncated_safetensors_file(tmp_path, net):
    model = bv.add_adapter(copy.deepcopy(net), CONFIGS["boft"](LINEAR))
    bv.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    snap = snapshot(net)
    with pytest.raises(ValueError, match="not a readable safetensors file .*truncated or corrupt"):
        bv.load_adapter(net, tmp_path)
    assert_unchanged(net, snap)


def test_missing_directory_and_existing_name(tmp_path, net):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        bv.load_adapter(net, tmp_path)
    model = bv.add_adapter(copy.deepcopy(net), CONFIGS["lora"](LINEAR))
    bv.save_adapter(model, tmp_path)
    bv.load_adapter(net, tmp_path)
    with pytest.raises(ValueError, match="adapter 'default' is already loaded"):
        bv.load_adapter(net, tmp_path)
    bv.load_adapter(net, tmp_path, name="second")
    assert isinstance(net.fc1, AdaptedLayer) and set(net.fc1.adapters) == {"default", "second"}


def test_training_a_topk_only_vblora_adapter_is_refused(tmp_path, net):
    cfg = bv.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=LINEAR, save_only_topk_weights=True)
    bv.save_adapter(bv.add_adapter(copy.deepcopy(net), cfg), tmp_path)
    model = bv.load_adapter(net, tmp_path)
    with torch.no_grad():
        model(torch.randn(2, 32), torch.randn(1, 8, 4, 4))
    model.fc1.adapters["default"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        model(torch.randn(2, 32), torch.randn(1, 8, 4, 4))


def test_switching_while_merged_is_refused(net):
    bv.add_adapter(net, CONFIGS["lora"](LINEAR, init=False), "a")
    bv.add_adapter(net, CONFIGS["boft"](LINEAR, init=False), "b")
    bv.merge_adapter(net)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        bv.set_adapter(net, "a")


def test_peft_init_that_rewrites_base_weights_is_refused():
    with pytest.raises(ValueError, match="'pissa' changes the base model's weights"):
        bv.config_from_dict({"peft_type": "LORA", "r": 4, "init_lora_weights": "pissa"})
    assert bv.config_from_dict({"peft_type": "LORA", "init_lora_weights": "gaussian"}).init_weights is True


def test_loading_for_inference_freezes_adapter_and_saved_modules(tmp_path, net):
    cfg = bv.LoRAConfig(r=2, target_modules=LINEAR, modules_to_save=["conv2"])
    model = bv.add_adapter(copy.deepcopy(net), cfg)
    assert model.conv2.weight.requires_grad
    bv.save_adapter(model, tmp_path)
    loaded = bv.load_adapter(net, tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in loaded.parameters())
