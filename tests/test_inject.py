"""What the public calls guarantee under real use: merging in any mode, modules_to_save per adapter,
gradient checkpointing and direct layer calls, PEFT's scoping options, failed calls that change
nothing, and the small edge cases (empty batches, padding modes, typed config errors)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from conftest import CONFIGS, CONV, LINEAR, METHODS
from torch import nn

import boftvision as bv
from boftvision.adapters import AdaptedLayer, ModulesToSaveWrapper


def run(model, inputs):
    return model(*inputs)


def loss_of(out):
    return sum(o.square().sum() for o in out)


def structure(model: nn.Module):
    """Everything a failed call must leave as it was."""
    return ([(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            list(model._forward_pre_hooks.values()), list(model._forward_hooks.values()),
            sorted(getattr(model, "boftvision_configs", {})))


# --- 1. merging never applies dropout --------------------------------------------------------------
@pytest.mark.parametrize("method", ["boft", "oft"])
def test_merge_in_train_mode_never_applies_dropout(net, inputs, method):
    config = CONFIGS[method](LINEAR + CONV, init=False)
    config.dropout = 0.5
    model = bv.add_adapter(net, config)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expected = run(model.eval(), inputs)
        model.train()
        bv.merge_adapter(model)  # still in train mode
        merged = run(model.eval(), inputs)
        model.train()
        bv.unmerge_adapter(model)
    for a, b in zip(merged, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert (p - weights[n]).abs().max() <= 1e-6, n


# --- 2. modules_to_save: one copy per adapter, the original untouched --------------------------------
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def train_a_step(model, x, lr=0.5):
    params = [p for p in model.parameters() if p.requires_grad]
    model(x).square().sum().backward()
    torch.optim.SGD(params, lr=lr).step()
    model.zero_grad()


def test_modules_to_save_are_copies_per_adapter(tmp_path):
    torch.manual_seed(0)
    model, x = Classifier(), torch.randn(4, 16)
    base_out = model(x).detach()
    original_head = model.head
    head_weight = original_head.weight.detach().clone()

    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]), "a")
    assert isinstance(model.head, ModulesToSaveWrapper)
    train_a_step(model, x)
    out_a = model(x).detach()
    assert not torch.allclose(out_a, base_out, atol=1e-3)
    torch.testing.assert_close(original_head.weight, head_weight, atol=0, rtol=0)  # never trained
    with bv.disable_adapter(model):
        torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=0)
    bv.save_adapter(model, tmp_path / "a", name="a")

    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]), "b")
    train_a_step(model, x, lr=1.0)
    bv.set_adapter(model, "a")
    torch.testing.assert_close(model(x), out_a, atol=1e-6, rtol=0)  # b's training left a's head alone

    fresh = Classifier()
    fresh.load_state_dict(copy.deepcopy(Classifier()).state_dict())
    torch.manual_seed(0)
    fresh = Classifier()
    bv.load_adapter(fresh, tmp_path / "a", name="a")
    torch.testing.assert_close(fresh(x), out_a, atol=1e-6, rtol=0)

    bv.remove_adapter(model)
    assert model.head is original_head
    torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=0)


def test_modules_to_save_load_never_writes_the_base_module(tmp_path):
    """An adapter file carrying a saved module (conv_in-style) fills the adapter's copy only."""
    torch.manual_seed(0)
    model = Classifier()
    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    with torch.no_grad():
        model.head.modules_to_save["default"].weight.fill_(7.0)
    bv.save_adapter(model, tmp_path)
    target = Classifier()
    original = target.head.weight.detach().clone()
    bv.load_adapter(target, tmp_path)
    assert (target.head.modules_to_save["default"].weight == 7.0).all()
    bv.remove_adapter(target)
    torch.testing.assert_close(target.head.weight, original, atol=0, rtol=0)


def test_modules_to_save_load_in_peft_with_separate_heads(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model, x = Classifier(), torch.randn(4, 16)
    reference = copy.deepcopy(model)
    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"], init_weights=False))
    train_a_step(model, x)
    bv.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(reference, str(tmp_path))
    torch.testing.assert_close(peft_model(x), model(x), atol=1e-5, rtol=1e-5)


# --- 3. the batched rotation never changes a result -------------------------------------------------
class Blocks(nn.Module):
    def __init__(self, width=32, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
                                    for _ in range(depth))
        self.checkpointing = None  # None | "reentrant" | "non_reentrant"

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                x = x + checkpoint.checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
            else:
                x = x + block(x)
        return x


TARGETS = r"blocks\.\d+\.[02]"


def orthogonal_config(method, dropout=0.0):
    if method == "oft":
        return bv.OFTConfig(block_size=8, use_cayley_neumann=False, target_modules=TARGETS, init_weights=False)
    return bv.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=TARGETS, init_weights=False,
                         dropout=dropout)


def grads_of(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_gives_the_plain_gradients(method, mode):
    torch.manual_seed(0)
    model = bv.add_adapter(Blocks(), orthogonal_config(method))
    x = torch.randn(5, 32, requires_grad=mode == "reentrant")
    expected = grads_of(model, x)
    model.checkpointing = mode
    got = grads_of(model, x)
    for a, b in zip([expected[0], *expected[1]], [got[0], *got[1]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in got[1])


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_direct_layer_calls_never_use_a_stale_rotation(method):
    torch.manual_seed(0)
    model = bv.add_adapter(Blocks(), orthogonal_config(method))
    x = torch.randn(5, 32)
    layer = model.blocks[0][0]
    model(x).square().sum().backward()
    layer(x).sum().backward()  # a direct backward after a full one: no freed graph is reused

    def direct():
        with torch.no_grad():
            return layer(x)

    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    expected = fresh.blocks[0][0](x)
    model(x)  # leaves nothing behind for the direct call
    model.load_state_dict(fresh.state_dict(), assign=True)
    torch.testing.assert_close(direct(), expected, atol=1e-5, rtol=1e-5)

    model2 = bv.add_adapter(Blocks(), orthogonal_config(method))
    model2.load_state_dict(model.state_dict())
    model2(x)
    raw = model2.blocks[0][0].adapters["default"].raw()
    before = model2.blocks[0][0](x).detach()
    raw.data.copy_(raw.data + 0.3 * torch.randn_like(raw))  # an edit autograd's version counter does not see
    assert not torch.allclose(model2.blocks[0][0](x), before, atol=1e-3)


def test_transformers_reentrant_gradient_checkpointing_trains_boft():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
    ids = torch.randint(0, 50, (2, 8))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = CLIPTextModel(config)
        bv.add_adapter(model, bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False,
                                            target_modules=["q_proj", "v_proj", "fc1"]))
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        model(input_ids=ids).last_hidden_state.square().sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_diffusers_gradient_checkpointing_trains_oft():
    from diffusers import UNet2DConditionModel

    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**kwargs)
        bv.add_adapter(unet, bv.OFTConfig(block_size=8, use_cayley_neumann=False, init_weights=False,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        unet.train()
        if checkpointed:
            unet.enable_gradient_checkpointing()
        unet(sample, 1, text).sample.square().sum().backward()
        grads.append([p.grad for p in unet.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --- 4. PEFT's scoping options --------------------------------------------------------------------
class Layered(nn.Module):
    def __init__(self):
        super().__init__()
        layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(16, 16), "v": nn.Linear(16, 16)}) for _ in range(3))
        self.encoder = nn.ModuleDict({"layers": layers})

    def forward(self, x):
        for layer in self.encoder["layers"]:
            x = layer["v"](torch.tanh(layer["q"](x)))
        return x


@pytest.mark.parametrize("options", [
    dict(layers_to_transform=[0, 2], layers_pattern="layers"),
    dict(layers_to_transform=1),
    dict(exclude_modules=["layers.1.q"]),
    dict(layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
    dict(exclude_modules=r".*\.2\.v"),
])
def test_peft_scoping_options_load_and_match_peft(tmp_path, options):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, x = Layered(), torch.randn(4, 16)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False,
                                                 **options))
    peft_model.save_pretrained(str(tmp_path))
    ours = bv.load_adapter(copy.deepcopy(reference), tmp_path)
    adapted = sorted(n for n, m in ours.named_modules() if isinstance(m, AdaptedLayer))
    peft_adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                          if hasattr(m, "lora_A") and isinstance(m, nn.Module) and hasattr(m, "base_layer"))
    assert adapted == peft_adapted and 0 < len(adapted) < 6
    torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=1e-5)


def test_peft_bias_training_is_refused_by_name(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(Layered(), LoraConfig(r=2, target_modules=["q"], bias="all")).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        bv.load_adapter(Layered(), tmp_path)


# --- 5. failed calls change nothing ----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_failed_load_leaves_the_model_as_it_was(tmp_path, net, method):
    source = bv.add_adapter(copy.deepcopy(net), CONFIGS[method](LINEAR))
    bv.save_adapter(source, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    for p in net.fc2.parameters():
        p.requires_grad_(False)  # a user's own choice, to be kept
    before = structure(net)
    with pytest.raises(ValueError, match="missing keys"):
        bv.load_adapter(net, tmp_path)
    assert structure(net) == before


def test_add_adapter_while_merged_changes_nothing(net):
    bv.add_adapter(net, CONFIGS["lora"](LINEAR), "a")
    bv.merge_adapter(net)
    before = structure(net)
    with pytest.raises(RuntimeError, match="is merged"):
        bv.add_adapter(net, CONFIGS["boft"](LINEAR), "b")
    assert structure(net) == before


def test_removing_every_adapter_restores_requires_grad(net):
    net.fc2.bias.requires_grad_(False)
    flags = [(n, p.requires_grad) for n, p in net.named_parameters()]
    bv.add_adapter(net, CONFIGS["boft"](LINEAR), "a")
    bv.add_adapter(net, CONFIGS["lora"](CONV), "b")
    bv.remove_adapter(net, "a")
    assert not any(p.requires_grad for n, p in net.named_parameters() if "adapters" not in n)
    bv.remove_adapter(net, "b")
    assert [(n, p.requires_grad) for n, p in net.named_parameters()] == flags
    assert not net._forward_pre_hooks and not net._forward_hooks


# --- 6. edge cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(net, method):
    model = bv.add_adapter(net, CONFIGS[method](LINEAR + CONV, init=False))
    out = model(torch.randn(0, 32), torch.randn(0, 8, 6, 6))
    assert out[0].shape == (0, 32) and out[1].shape == (0, 16, 6, 6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_conv_padding_modes_merge_exactly(net, inputs, method, padding_mode):
    net.conv1.padding_mode = padding_mode
    model = bv.add_adapter(net, CONFIGS[method](CONV, init=False))
    with torch.no_grad():
        unmerged = run(model, inputs)[1]
        bv.merge_adapter(model)
        torch.testing.assert_close(run(model, inputs)[1], unmerged, atol=1e-5, rtol=1e-5)


def test_merge_inside_disable_adapter_is_refused(net, inputs):
    model = bv.add_adapter(net, CONFIGS["lora"](LINEAR, init=False))
    with bv.disable_adapter(model):
        with pytest.raises(RuntimeError, match="disable_adapter"):
            bv.merge_adapter(model)
    assert all(layer.merged is None for _, layer in bv.inject.adapted_layers(model))


@pytest.mark.parametrize("make,field", [
    (lambda: bv.LoRAConfig(alpha="16", target_modules=["fc1"]), "alpha"),
    (lambda: bv.LoRAConfig(dropout="0.1", target_modules=["fc1"]), "dropout"),
    (lambda: bv.LoRAConfig(target_modules=[1, 2]), "target_modules"),
    (lambda: bv.BOFTConfig(block_size=8.0, target_modules=["fc1"]), "block_size"),
    (lambda: bv.OFTConfig(block_size=8, num_cayley_neumann_terms=10**9), "num_cayley_neumann_terms"),
    (lambda: bv.LoRAConfig(r=True), " r "),
    (lambda: bv.config_from_dict({"peft_type": "LORA", "r": 4, "layers_to_transform": "0"}), "layers_to_transform"),
])
def test_wrongly_typed_config_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_a_target_list_with_an_unsupported_module_is_refused(net):
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    model = WithNorm()
    before = structure(model)
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\)"):
        bv.add_adapter(model, bv.LoRAConfig(target_modules=["fc", "norm"]))
    assert structure(model) == before
    bv.add_adapter(model, bv.LoRAConfig(target_modules=["fc", "norm"], exclude_modules=["norm"]))


def test_multihead_attention_out_proj_warns():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.warns(UserWarning, match="never calls it"):
        bv.add_adapter(model, bv.LoRAConfig(target_modules=["out_proj"]))


def test_config_round_trip_keeps_scoping_options(tmp_path):
    config = bv.LoRAConfig(r=2, target_modules=["q"], layers_to_transform=[1], layers_pattern="layers",
                           exclude_modules=["x"])
    data = json.loads(json.dumps(config.to_dict()))
    assert bv.config_from_dict(data) == config
