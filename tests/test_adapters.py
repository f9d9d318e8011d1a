"""Adapter behaviour, parametrised over method × layer type."""
import copy
import dataclasses

import pytest
import torch
from conftest import CONFIGS, CONV, LINEAR, METHODS, TinyNet
from torch import nn

import boftvision as bv
from boftvision.adapters import AdaptedLayer
from boftvision.adapters.orthogonal import SHARED_ROTATIONS
from boftvision.inject import adapted_layers
from boftvision.ops.orthogonal import dense_rotation, orthogonality_error, skew_from_square, upper_from_skew

LAYER_KINDS = {"linear": LINEAR, "conv": CONV}
CASES = [(m, k) for m in METHODS for k in LAYER_KINDS]
# OFT/BOFT with LyCORIS's orientation: R acts on the output channels (R·W0)
OUTPUT_SIDE = {f"{m}_output": lambda t, init=True, m=m: dataclasses.replace(CONFIGS[m](t, init), orientation="output")
               for m in ("oft", "boft")}
ALL_CONFIGS = {**CONFIGS, **OUTPUT_SIDE}


def run(model, inputs):
    return model(*inputs)


def close(a, b, atol=1e-5):
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b))


@pytest.mark.parametrize("method,kind", CASES)
def test_identity_at_init(net, inputs, method, kind):
    base_out = run(copy.deepcopy(net), inputs)
    model = bv.add_adapter(net, CONFIGS[method](LAYER_KINDS[kind]))
    out = run(model, inputs)
    if method == "vblora":  # paper/PEFT: both factors come from the random bank, ΔW is small, not 0
        cfg = bv.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=LAYER_KINDS[kind])
        small = bv.add_adapter(TinyNet(), cfg)
        for _, layer in adapted_layers(small):
            delta = layer.adapters["default"].delta_weight(layer.base_layer)
            assert delta.abs().max() <= cfg.r * cfg.init_vector_bank_bound ** 2
        return
    for a, b in zip(out, base_out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_equals_forward_and_unmerge_restores(net, inputs, method, kind):
    original = {k: v.clone() for k, v in net.state_dict().items()}
    model = bv.add_adapter(net, CONFIGS[method](LAYER_KINDS[kind], init=False)).eval()
    with torch.no_grad():
        adapted = run(model, inputs)
        base = run(copy.deepcopy(net).apply(lambda m: setattr(m, "disabled", True)
                                              if isinstance(m, AdaptedLayer) else None), inputs)
        assert not close(adapted, base, 1e-3)  # the adapter does something
        bv.merge_adapter(model)
        assert close(run(model, inputs), adapted)
        bv.unmerge_adapter(model)
        assert close(run(model, inputs), adapted)
    for name, layer in adapted_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, original[f"{name}.weight"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,kind", CASES)
def test_gradients_reach_only_adapter_parameters(net, inputs, method, kind):
    model = bv.add_adapter(net, CONFIGS[method](LAYER_KINDS[kind], init=False))
    sum(o.square().sum() for o in run(model, inputs)).backward()
    for name, p in model.named_parameters():
        is_adapter = ".adapters.default." in name or name == "boftvision_shared_default_vblora_vector_bank"
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_input_side_equals_weight_side(net, inputs, method):
    model = bv.add_adapter(net, CONFIGS[method](LINEAR, init=False))
    x = inputs[0].requires_grad_(True)
    results = {}
    for side in ("input", "weight"):
        for _, layer in adapted_layers(model):
            layer.adapters["default"].rotation_side = side
        model.zero_grad()
        x.grad = None
        out = model.fc2(torch.tanh(model.fc1(x)))
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[side] = (out.detach(), x.grad.clone(), grads)
    a, b = results["input"], results["weight"]
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    for ga, gb in zip(a[2], b[2]):
        torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)


def test_collapsed_and_factorwise_rotation_agree(net, inputs):
    model = bv.add_adapter(net, CONFIGS["boft"](LINEAR + CONV, init=False))
    results = []
    for collapse in (True, False):
        for _, layer in adapted_layers(model):
            layer.adapters["default"].collapse = collapse
        model.zero_grad()
        out = run(model, inputs)
        sum(o.square().sum() for o in out).backward()
        results.append(([o.detach() for o in out], [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_auto_side_by_cost(net):
    model = bv.add_adapter(net, CONFIGS["boft"](LINEAR))
    adapter = model.fc1.adapters["default"]  # n = 64 output rows, m = 2
    assert adapter.choose_side(torch.randn(1000, 32)) == "weight"  # rotating 64 rows beats 1000 tokens
    with torch.no_grad():
        assert adapter.choose_side(torch.randn(1000, 32)) == "weight"
        assert adapter.choose_side(torch.randn(8, 32)) == "input"  # fewer tokens than rows
    wide = bv.add_adapter(torch.nn.Sequential(torch.nn.Linear(32, 4096)), bv.OFTConfig(block_size=8,
                                                                                        target_modules=["0"]))
    # training a wide layer: the weight side's extra tokens×n×d gradient matmul costs more
    assert wide[0].adapters["default"].choose_side(torch.randn(4096, 32)) == "input"


@pytest.mark.parametrize("method,kind", [(m, k) for m in ("oft", "boft") for k in LAYER_KINDS])
def test_rotation_is_orthogonal_with_exact_cayley(net, method, kind):
    model = bv.add_adapter(net, CONFIGS[method](LAYER_KINDS[kind], init=False))
    for _, layer in adapted_layers(model):
        blocks = layer.adapters["default"].orthogonal_blocks()
        assert orthogonality_error(blocks) <= 1e-5
        assert orthogonality_error(dense_rotation(blocks).unsqueeze(0)) <= 1e-5


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_boft_with_one_factor_equals_oft(net, inputs, kind):
    boft = bv.add_adapter(copy.deepcopy(net), bv.BOFTConfig(block_size=8, target_modules=LAYER_KINDS[kind],
                                                           init_weights=False)).eval()
    oft = bv.add_adapter(copy.deepcopy(net), bv.OFTConfig(block_size=8, use_cayley_neumann=False,
                                                         target_modules=LAYER_KINDS[kind])).eval()
    for (_, lb), (_, lo) in zip(adapted_layers(boft), adapted_layers(oft)):
        b, o = lb.adapters["default"], lo.adapters["default"]
        with torch.no_grad():
            b.boft_s.fill_(1.0)
            o.oft_R.copy_(upper_from_skew(skew_from_square(b.boft_R[0])))
    with torch.no_grad():
        assert close(run(boft, inputs), run(oft, inputs))


def test_two_adapters_switch_and_match_single_adapter_models(net, inputs):
    lora_cfg, boft_cfg = CONFIGS["lora"](LINEAR, init=False), CONFIGS["boft"](LINEAR + CONV, init=False)
    torch.manual_seed(5)
    only_lora = bv.add_adapter(copy.deepcopy(net), lora_cfg)
    torch.manual_seed(6)
    only_boft = bv.add_adapter(copy.deepcopy(net), boft_cfg)
    torch.manual_seed(5)
    both = bv.add_adapter(net, lora_cfg, "a")
    torch.manual_seed(6)
    bv.add_adapter(both, boft_cfg, "b")
    with torch.no_grad():
        assert close(run(both, inputs), run(only_boft, inputs))
        bv.set_adapter(both, "a")
        assert close(run(both, inputs), run(only_lora, inputs))
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)


@pytest.mark.parametrize("method", METHODS)
def test_remove_adapter_restores_original_modules_and_state(net, method):
    originals = dict(net.named_children())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    bv.add_adapter(net, CONFIGS[method](LINEAR + CONV, init=False))
    bv.merge_adapter(net)
    bv.remove_adapter(net)
    for name, module in net.named_children():
        assert module is originals[name]
    assert net.state_dict().keys() == state.keys()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-5, rtol=0)


def test_disable_adapter_runs_the_base_model(net, inputs):
    base_out = run(copy.deepcopy(net), inputs)
    model = bv.add_adapter(net, CONFIGS["boft"](LINEAR + CONV, init=False))
    bv.merge_adapter(model)
    with torch.no_grad(), bv.disable_adapter(model):
        assert close(run(model, inputs), base_out)
    with torch.no_grad():
        assert not close(run(model, inputs), base_out, 1e-3)
        assert all(layer.merged == "default" for _, layer in adapted_layers(model))


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_keeps_fp32_adapters(net, inputs, method):
    ref = bv.add_adapter(copy.deepcopy(net), CONFIGS[method](LINEAR + CONV, init=False))
    model = copy.deepcopy(ref)
    for _, layer in adapted_layers(model):
        layer.base_layer.to(torch.bfloat16)
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params)
    x, img = (t.to(torch.bfloat16) for t in inputs)
    out = model.fc2(torch.tanh(model.fc1(x))), model.conv2(torch.tanh(model.conv1(img)))
    assert all(o.dtype == torch.bfloat16 for o in out)
    expected = run(ref, inputs)
    for o, e in zip(out, expected):
        assert (o.float() - e).abs().max() < 0.05 * e.abs().max() + 0.05
    sum(o.float().square().sum() for o in out).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_params)
    # autocast: fp32 base and inputs, bf16 compute, fp32 adapter parameters and gradients
    model32 = copy.deepcopy(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model32, inputs)
    sum(o.float().square().sum() for o in out).backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model32.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", list(ALL_CONFIGS))
def test_short_training_lowers_the_loss(method):
    """Regress a teacher that differs from the student by a small rotation+shift of its weights."""
    torch.manual_seed(0)
    student, teacher = TinyNet(), TinyNet()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, img = torch.randn(64, 32), torch.randn(16, 8, 6, 6)
    with torch.no_grad():
        target = teacher(x, img)
    model = bv.add_adapter(student, ALL_CONFIGS[method](LINEAR + CONV))
    optim = torch.optim.Adam(bv.parameter_groups(model, lr=1e-2), lr=1e-2)

    def loss_fn():
        out = model(x, img)
        return sum(nn.functional.mse_loss(o, t) for o, t in zip(out, target))

    first = loss_fn().item()
    for _ in range(60):
        optim.zero_grad()
        loss = loss_fn()
        loss.backward()
        optim.step()
    assert loss_fn().item() < 0.7 * first


def test_butterfly_interpolation_endpoints_and_order(net, inputs):
    base_out = run(copy.deepcopy(net), inputs)
    model = bv.add_adapter(net, bv.BOFTConfig(block_size=4, n_butterfly_factor=3, target_modules=LINEAR + ["conv2"],
                                             init_weights=False)).eval()
    with torch.no_grad():
        tuned = run(model, inputs)
        assert bv.butterfly_interpolation(model, 0) == 3
        assert close(run(model, inputs), tuned)
        bv.butterfly_interpolation(model, 3, reset_scale=True)
        for a, b in zip(run(model, inputs), base_out):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
        # one component to identity == the model whose leftmost factor boft_R[m-1] is zero
        bv.butterfly_interpolation(model, 1)
        one = run(model, inputs)
        bv.butterfly_interpolation(model, 0)
        manual = copy.deepcopy(model)
        for _, layer in adapted_layers(manual):
            layer.adapters["default"].boft_R[-1].zero_()
        assert close(one, run(manual, inputs))
        assert not close(one, tuned, 1e-3)
        with bv.interpolated(model, 2):
            assert not close(run(model, inputs), tuned, 1e-3)
        assert close(run(model, inputs), tuned)
    with pytest.raises(ValueError, match=r"n_identity must be in \[0, 3\]"):
        bv.butterfly_interpolation(model, 4)


def test_parameter_counts_match_the_formulas(net):
    cfg = bv.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=LINEAR)
    bv.add_adapter(net, cfg)
    counts = bv.count_parameters(net)
    # fc1: d=32 -> N=8 blocks, fc2: d=64 -> N=16; stored = m·N·b(b−1)/2 + n (scale)
    assert counts.stored == 2 * 8 * 6 + 64 + 2 * 16 * 6 + 32
    assert counts.trainable == 2 * 8 * 16 + 64 + 2 * 16 * 16 + 32
    assert counts.total == sum(p.numel() for p in net.parameters())
    assert "trainable params: 864" in str(counts)

    vb = TinyNet()
    vcfg = bv.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, topk=2, target_modules=LINEAR)
    bv.add_adapter(vb, vcfg)
    subvectors = 2 * (32 // 8) + (64 // 8) * 2 + 2 * (64 // 8) + (32 // 8) * 2
    # bank + per sub-vector k uint8 indices (¼ of an fp32 each) + (k−1) weights: the paper's 1.5 for k=2
    assert bv.count_parameters(vb).stored == 16 * 8 + 1.5 * subvectors
    assert bv.count_parameters(vb).trainable == 16 * 8 + 16 * subvectors


def test_vblora_bank_is_shared_and_has_its_own_learning_rate(net):
    bv.add_adapter(net, CONFIGS["vblora"](LINEAR + CONV))
    banks = {id(layer.adapters["default"].vblora_vector_bank) for _, layer in adapted_layers(net)}
    assert len(banks) == 1
    groups = bv.parameter_groups(net, lr=1e-3, vector_bank_lr=1e-3, logits_lr=1e-2)
    assert [len(g["params"]) for g in groups] == [1, 8] and groups[1]["lr"] == 1e-2


def test_wrapper_exposes_base_attributes(net):
    bv.add_adapter(net, CONFIGS["lora"](LINEAR))
    assert isinstance(net.fc1, AdaptedLayer)
    assert net.fc1.in_features == 32 and net.fc1.weight is net.fc1.base_layer.weight


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_batched_rotations_equal_per_layer_ones(net, inputs, method):
    """The model's pre-hook computes all layers' rotations in one batch; a model without the hook
    computes them layer by layer: same outputs and gradients, and an optimizer step is seen at once."""
    shared = bv.add_adapter(net, CONFIGS[method](LINEAR + CONV, init=False))
    alone = copy.deepcopy(shared)
    alone._forward_pre_hooks.clear()
    adapter = shared.fc1.adapters["default"]
    seen = []  # what fc1 finds when called inside the model's forward
    shared.fc1.register_forward_pre_hook(lambda *_: seen.append(SHARED_ROTATIONS.get(adapter)))
    grads = []
    for model in (shared, alone):
        out = run(model, inputs)
        sum(o.square().sum() for o in out).backward()
        grads.append(([o.detach() for o in out], [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    for a, b in zip(grads[0][0] + grads[0][1], grads[1][0] + grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert seen[0] is not None and seen[0][1][1:] == adapter.state_key()[1:]  # the batch ran for fc1
    assert adapter not in SHARED_ROTATIONS  # and serves that forward only
    torch.optim.SGD([p for p in shared.parameters() if p.requires_grad], lr=0.5).step()
    x = inputs[0]
    with torch.no_grad():  # a direct call after the step: the stale batched rotation is not used
        expected = shared.fc1.base_layer(adapter.rotate(x, adapter.operand(adapter.rotation_blocks())))
        expected = expected if method == "oft" else \
            (expected - shared.fc1.bias) * adapter.boft_s.reshape(-1) + shared.fc1.bias
        torch.testing.assert_close(shared.fc1(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_factors", [2, 5])
def test_a_rotation_serves_several_backward_passes_and_refuses_a_changed_parameter(n_factors):
    """The batched rotation keeps its small graph: two backward passes through one forward's rotation
    give twice the gradient (what reentrant checkpointing needs); a parameter stepped in between is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    bv.add_adapter(model, bv.BOFTConfig(block_size=4, n_butterfly_factor=n_factors, init_weights=False,
                                        target_modules=["0", "2"]))
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(7, 64)
    loss = model(x).square().sum()
    once = torch.autograd.grad(loss, params, retain_graph=True)
    twice = torch.autograd.grad(2 * loss, params, retain_graph=True)
    for a, b in zip(once, twice):
        torch.testing.assert_close(2 * a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        params[0].add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place .* step after backward"):
        loss.backward()


@pytest.mark.parametrize("orientation", ["input", "output"])
def test_deep_butterflies_batch_across_layers(orientation):
    """Full butterflies (two block products) of layers of different widths get their rotations from one
    batched computation: same outputs and gradients as layer by layer."""
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 128))
    bv.add_adapter(shared, bv.BOFTConfig(block_size=4, n_butterfly_factor=6, init_weights=False,
                                         orientation=orientation, target_modules=["0", "2", "4"]))
    adapters = [shared[i].adapters["default"] for i in (0, 2, 4)]
    assert all(a.two_product for a in adapters)
    alone = copy.deepcopy(shared)
    alone._forward_pre_hooks.clear()
    seen = []
    shared[2].register_forward_pre_hook(lambda *_: seen.append(SHARED_ROTATIONS.get(adapters[1])))
    x = torch.randn(5, 128)
    results = []
    for model in (shared, alone):
        out = model(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert seen[0] is not None  # the batch ran


def test_compiled_model_equals_eager(net, inputs):
    """torch.compile'd BOFT (the fused path: per-layer kernels fused by inductor, no batched hook)
    equals the eager path, outputs and gradients."""
    eager = bv.add_adapter(net, CONFIGS["boft"](LINEAR + CONV, init=False))
    compiled = torch.compile(copy.deepcopy(eager))
    grads = []
    for model in (eager, compiled):
        out = run(model, inputs)
        sum(o.square().sum() for o in out).backward()
        grads.append([o.detach() for o in out] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_adapters_follow_the_models_train_mode(net, method):
    """An adapter added to (or loaded into) a model in eval mode is in eval mode: no dropout at inference."""
    model = bv.add_adapter(net.eval(), CONFIGS[method](LINEAR))
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("method,kind", [(m, k) for m in OUTPUT_SIDE for k in LAYER_KINDS])
def test_output_orientation_rotates_the_output_channels(net, inputs, method, kind):
    """W' = s ⊙ R W0 with R (n × n) over the output channels, on the activations and on the weight,
    merged, and unmerged back to W0."""
    reference, originals = copy.deepcopy(net), {n: p.detach().clone() for n, p in net.named_parameters()}
    model = bv.add_adapter(net, OUTPUT_SIDE[method](LAYER_KINDS[kind], init=False)).eval()
    with torch.no_grad():
        for name in LAYER_KINDS[kind]:
            adapter, weight = getattr(model, name).adapters["default"], getattr(reference, name).weight
            r = dense_rotation(adapter.rotation_blocks(dropout=False))
            assert r.shape == (weight.shape[0],) * 2 and orthogonality_error(r) < 1e-5
            rotated = (r @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape)
            s = adapter.scale()
            weight.copy_(rotated if s is None else rotated * s.reshape(-1, *[1] * (weight.dim() - 1)))
        expected = run(reference, inputs)
        for side in ("input", "weight"):
            for _, layer in adapted_layers(model):
                layer.adapters["default"].rotation_side = side
            assert close(run(model, inputs), expected)
        bv.merge_adapter(model)
        assert close(run(model, inputs), expected)
        bv.unmerge_adapter(model)
    for name in LAYER_KINDS[kind]:
        torch.testing.assert_close(getattr(model, name).base_layer.weight, originals[f"{name}.weight"],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(OUTPUT_SIDE))
def test_output_orientation_batches_rotations_and_interpolates(net, inputs, method):
    base_out = run(copy.deepcopy(net), inputs)
    shared = bv.add_adapter(net, OUTPUT_SIDE[method](LINEAR + CONV, init=False))
    alone = copy.deepcopy(shared)
    alone._forward_pre_hooks.clear()  # layer by layer
    results = []
    for model in (shared, alone):
        out = run(model, inputs)
        sum(o.square().sum() for o in out).backward()
        results.append([o.detach() for o in out] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # every butterfly component to identity, scale reset: the base model
        bv.butterfly_interpolation(shared.eval(), bv.num_butterfly_components(shared), reset_scale=True)
        assert close(run(shared, inputs), base_out, 1e-6)


@pytest.mark.parametrize("orientation", ["input", "output"])
def test_deep_butterflies_run_as_two_block_products(orientation, monkeypatch):
    """BOFT deeper than the collapse span (full butterfly, m = 6 on width 256, b = 8) applies R as two
    block products (32 wide each: on CPU the oneDNN grouped path): outputs and gradients equal the
    factor-by-factor path, on both sides, Linear and Conv2d, and merge equals the forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.Conv2d(256, 256, 1))
    config = bv.BOFTConfig(block_size=8, n_butterfly_factor=0, init_weights=False, target_modules=["0", "1"],
                           orientation=orientation)
    fast = bv.add_adapter(copy.deepcopy(net), config)
    slow = copy.deepcopy(fast)
    assert all(layer.adapters["default"].two_product for _, layer in adapted_layers(fast))
    for _, layer in adapted_layers(slow):
        layer.adapters["default"].two_product = False
    x = torch.randn(6, 256)

    def run_both(model):
        return model[1](model[0](x)[..., None, None]).flatten(1)

    results = []
    for model in (fast, slow):
        for side in ("input", "weight"):
            for _, layer in adapted_layers(model):
                layer.adapters["default"].rotation_side = side
            out = run_both(model)
            out.square().sum().backward()
            results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
            model.zero_grad()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    from boftvision.ops import block_kernel

    if block_kernel.ONEDNN:  # the fast path above went through the chained grouped products
        chain = block_kernel.TwoProductChain.apply
        calls = []
        monkeypatch.setattr(block_kernel.TwoProductChain, "apply", lambda *a: calls.append(1) or chain(*a))
        run_both(fast)
        assert len(calls) == 2  # both products of each of the two layers in one chain
    with torch.no_grad():
        expected = run_both(fast)
        bv.merge_adapter(fast)
        torch.testing.assert_close(run_both(fast), expected, atol=1e-4, rtol=1e-4)


def test_two_block_products_in_bf16_fp16_and_on_conv1d():
    """The two-product path keeps a bf16 / fp16 model's dtype and agrees with the factor-by-factor path to
    that precision; transformers' Conv1D (GPT-2) takes it like a Linear."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for net, x in ((nn.Sequential(nn.Linear(128, 128)).to(torch.bfloat16), torch.randn(4, 128, dtype=torch.bfloat16)),
                   (nn.Sequential(nn.Linear(128, 128)).to(torch.float16), torch.randn(4, 128, dtype=torch.float16)),
                   (nn.Sequential(Conv1D(128, 128)), torch.randn(4, 128))):
        config = bv.BOFTConfig(block_size=8, n_butterfly_factor=0, init_weights=False, target_modules=["0"])
        fast = bv.add_adapter(copy.deepcopy(net), config)
        slow = copy.deepcopy(fast)
        slow[0].adapters["default"].two_product = False
        assert fast[0].adapters["default"].two_product
        with torch.no_grad():
            got, expected = fast(x), slow(x)
        assert got.dtype == x.dtype
        tolerance = {torch.bfloat16: 0.03, torch.float16: 5e-3}.get(x.dtype, 1e-5)
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
