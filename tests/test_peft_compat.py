"""PEFT compatibility both ways: PEFT's save_pretrained loads here with equal outputs, and ours loads in
PeftModel.from_pretrained with equal outputs (max abs error ≤ 1e-5 in fp32)."""
import copy
import json

import peft
import pytest
import torch
from peft_reference import peft_from_pretrained, peft_model
from torch import nn

import boftvision as bv


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(32, 64)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.lin1 = nn.Linear(64, 32)
        self.pointwise = nn.Conv2d(16, 16, 1)

    def forward(self, x, img):
        return self.lin1(torch.relu(self.lin0(x))), self.pointwise(torch.relu(self.conv(img)))


LIN, ALL = ["lin0", "lin1"], ["lin0", "lin1", "conv"]
CASES = {
    "lora": peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, init_lora_weights=False),
    "oft_neumann": peft.OFTConfig(oft_block_size=4, r=0, target_modules=LIN, init_weights=False),
    "oft_exact": peft.OFTConfig(oft_block_size=8, r=0, target_modules=LIN, init_weights=False,
                                use_cayley_neumann=False),
    "oft_block_num_conv1x1": peft.OFTConfig(r=4, oft_block_size=0, target_modules=["lin0", "pointwise"],
                                            init_weights=False),
    "boft_m1": peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=ALL,
                               init_weights=False),
    "boft_m2_b8": peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=ALL,
                                  init_weights=False),
    "boft_m3_b4": peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=ALL,
                                  init_weights=False),
    "boft_block_num": peft.BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                                      target_modules=LIN, init_weights=False),
    "vblora": peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=LIN),
    "vblora_topk": peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=LIN,
                                     save_only_topk_weights=True),
}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return Net(), (torch.randn(3, 5, 32), torch.randn(2, 16, 6, 6))


def randomise_vblora_logits(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vblora_logits" in n:
                p.normal_()


def max_error(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("case", CASES)
def test_peft_directory_loads_with_equal_outputs(tmp_path, data, case):
    base, inputs = data
    reference = peft_model(base, CASES[case])
    randomise_vblora_logits(reference)
    reference.save_pretrained(tmp_path)
    reference.eval()
    ours = bv.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert max_error(reference(*inputs), ours(*inputs)) <= 1e-5
        bv.merge_adapter(ours)
        assert max_error(reference(*inputs), ours(*inputs)) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_our_directory_loads_in_peft_with_equal_outputs(tmp_path, data, case):
    base, inputs = data
    config = bv.config_from_dict(CASES[case].to_dict())
    config.init_weights = False
    torch.manual_seed(1)
    ours = bv.add_adapter(copy.deepcopy(base), config).eval()
    if config.method == "vblora":
        randomise_vblora_logits(ours)
    bv.save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == CASES[case].peft_type.value
    reference = peft_from_pretrained(base, tmp_path).eval()  # PEFT's true m > 1 (see peft_reference.py)
    with torch.no_grad():
        assert max_error(reference(*inputs), ours(*inputs)) <= 1e-5


def test_training_gradients_match_peft_boft(data):
    base, (x, img) = data
    reference = peft_model(base, CASES["boft_m2_b8"])
    ours = bv.add_adapter(copy.deepcopy(base), bv.config_from_dict(CASES["boft_m2_b8"].to_dict()))
    with torch.no_grad():
        for name, layer in [("lin0", ours.lin0), ("lin1", ours.lin1), ("conv", ours.conv)]:
            ref_layer = reference.base_model.model.get_submodule(name)
            layer.adapters["default"].boft_R.copy_(ref_layer.boft_R["default"])
            layer.adapters["default"].boft_s.copy_(ref_layer.boft_s["default"])
    for model in (reference, ours):
        sum(o.square().sum() for o in model(x, img)).backward()
    for name in ("lin0", "lin1", "conv"):
        ref_grad = reference.base_model.model.get_submodule(name).boft_R["default"].grad
        our_grad = ours.get_submodule(name).adapters["default"].boft_R.grad
        torch.testing.assert_close(our_grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_unknown_config_keys_warn_and_load(tmp_path, data):
    base, inputs = data
    model = bv.add_adapter(copy.deepcopy(base), bv.LoRAConfig(r=2, target_modules=LIN, init_weights=False))
    bv.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_option"):
        loaded = bv.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert max_error(loaded(*inputs), model(*inputs)) == 0.0


def test_unsupported_peft_feature_is_refused(tmp_path, data):
    base, _ = data
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=LIN, use_dora=True))
    reference.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        bv.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("case", ["lora", "vblora"])
def test_training_gradients_match_peft_additive(tmp_path, data, case):
    """LoRA and VB-LoRA in training (the branch and the sum as one addmm here): the inputs' gradients and
    every adapter parameter's gradient equal PEFT's."""
    base, inputs = data
    reference = peft_model(base, CASES[case])
    randomise_vblora_logits(reference)
    reference.save_pretrained(tmp_path)
    ours = bv.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    grads = []
    for model in (reference, ours):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        sum(o.square().sum() for o in model(*leaves)).backward()
        grads.append(([t.grad for t in leaves], {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref_inputs, ref_params), (our_inputs, our_params) = grads
    for got, want in zip(our_inputs, ref_inputs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    def key(name):  # one spelling for both: "lin0.lora_A.weight", "vector_bank"
        name = name.removeprefix("base_model.model.").replace("adapters.default.", "").replace(".default", "")
        return "vector_bank" if "vector_bank" in name else name

    assert {key(n) for n in our_params} == {key(n) for n in ref_params}
    for name, grad in our_params.items():
        torch.testing.assert_close(grad, ref_params[next(n for n in ref_params if key(n) == key(name))],
                                   atol=1e-5, rtol=1e-5)
