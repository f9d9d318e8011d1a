"""CUDA checks (marker `gpu`; skipped where CUDA is absent): bf16 training path on the device."""
import copy

import pytest
import torch
from conftest import CONFIGS, CONV, LINEAR, METHODS, TinyNet

import boftvision as bv
from boftvision.inject import adapted_layers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", METHODS)
def test_cuda_bf16_matches_cpu_fp32(method):
    torch.manual_seed(0)
    cpu = bv.add_adapter(TinyNet(), CONFIGS[method](LINEAR + CONV, init=False)).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x, img = torch.randn(4, 32), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = cpu(x, img)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda(), img.cuda())
    for o, e in zip(out, expected):
        assert (o.float().cpu() - e).abs().max() < 0.05 * e.abs().max() + 0.05


@pytest.mark.parametrize("side", ["input", "weight"])
def test_cuda_sides_agree_with_gradients(side):
    torch.manual_seed(0)
    model = bv.add_adapter(TinyNet(), CONFIGS["boft"](LINEAR, init=False)).cuda()
    ref = copy.deepcopy(model).cpu()
    for _, layer in adapted_layers(model):
        layer.adapters["default"].rotation_side = side
    x = torch.randn(64, 32)
    model.fc2(model.fc1(x.cuda())).square().sum().backward()
    ref.fc2(ref.fc1(x)).square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad.cpu(), q.grad, atol=1e-3, rtol=1e-3)


def test_dreambooth_fp16_on_cuda_keeps_adapters_fp32(tmp_path):
    """fp16 mixed precision with a GradScaler: fp32 adapter parameters, so no "Attempting to unscale FP16
    gradients" error; the embedded model and bundled subject, 5 steps, one validation."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "train_scripts"))
    import train_dreambooth_boft

    result = train_dreambooth_boft.main([
        "--instance_data_dir", str(root / "boftvision/assets/sks-instance"),
        "--instance_prompt", "a photo of sks shape",
        "--mixed_precision", "fp16", "--max_train_steps", "5", "--train_text_encoder", "--learning_rate", "1e-3",
        "--output_dir", str(tmp_path), "--validation_prompt", "a photo of sks shape", "--validation_steps", "5",
        "--num_validation_images", "2", "--num_inference_steps", "5"])
    assert result["steps"] == 5 and all(torch.isfinite(torch.tensor(result["losses"])))
    for part in ("unet", "text_encoder"):
        assert {t.dtype for t in bv.io.read_adapter(tmp_path / part)[1].values()} == {torch.float32}


def test_cuda_compiled_boft_equals_eager_with_gradients():
    """The fused (torch.compile'd) path on the GPU equals the eager one: outputs and gradients."""
    torch.manual_seed(0)
    eager = bv.add_adapter(TinyNet(), CONFIGS["boft"](LINEAR + CONV, init=False)).cuda()
    compiled = torch.compile(copy.deepcopy(eager))
    x, img = torch.randn(4, 32, device="cuda"), torch.randn(2, 8, 6, 6, device="cuda")
    grads = []
    for model in (eager, compiled):
        out = model(x, img)
        sum(o.square().sum() for o in out).backward()
        grads.append([o.detach() for o in out] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_lm_and_dreambooth_scripts_under_accelerates_fsdp_on_cuda(engine, lm_run_inputs, tiny_sd, tmp_path):
    """The scripts under `accelerate launch --config_file configs/accelerate/<engine>.yaml` on one GPU, the
    shipped config as it is (accelerate allows FSDP on one GPU): accelerate wrapped the blocks, the fp32 run
    equals the unsharded one (≤ 1e-4), and a bf16 run keeps its loss falling and writes fp32 adapters."""
    import json

    from conftest import SD_ADAPTER_SIZES, accelerate_launch, lm_script_args, write_instance_images
    from safetensors.torch import load_file

    def adapter(out, part):
        return load_file(out / part / "adapter_model.safetensors")

    plain, sharded = tmp_path / "lm-plain", tmp_path / "lm-fsdp"
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, plain), processes=1, device="cuda")
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, sharded), engine, processes=1,
                      device="cuda", report=tmp_path / "lm-report")
    assert f"DistributedType.FSDP fsdp_version={engine[-1]} processes=1" in (tmp_path / "lm-report.0").read_text()
    ours, theirs = adapter(sharded, "adapter"), adapter(plain, "adapter")
    assert all((ours[k] - theirs[k]).abs().max() <= 1e-4 for k in theirs)
    bf16 = tmp_path / "lm-bf16"
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, bf16), engine, processes=1, device="cuda",
                      mixed_precision="bf16")
    losses = json.loads((bf16 / "results.json").read_text())["losses"]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert all(t.dtype == torch.float32 for t in adapter(bf16, "adapter").values())

    write_instance_images(tmp_path / "instance", 2)
    steady = ("--adam_epsilon", "1")  # AdamW ≈ SGD: float noise in near-zero gradients is not turned into ±lr
    runs = {}
    blocks = "BasicTransformerBlock,ResnetBlock2D,CLIPEncoderLayer"  # UNet and text encoder, prepared as one
    for name, extra in (("plain", {}), ("fsdp", {"engine": engine, "wrap": blocks})):
        runs[name] = tmp_path / f"db-{name}"
        accelerate_launch("train_dreambooth_boft.py", [
            "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(tmp_path / "instance"),
            "--instance_prompt", "a photo of sks shape", "--output_dir", str(runs[name]), "--seed", "0",
            "--train_batch_size", "2", "--learning_rate", "0.05", "--boft_dropout", "0", "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--train_text_encoder", *steady, *SD_ADAPTER_SIZES], processes=1,
            device="cuda", **extra)
    for part in ("unet", "text_encoder"):
        ours, theirs = adapter(runs["fsdp"], part), adapter(runs["plain"], part)
        assert all((ours[k] - theirs[k]).abs().max() <= 1e-4 for k in theirs), part


def test_lm_script_under_accelerates_deepspeed_zero3_on_cuda(lm_run_inputs, tmp_path):
    """train_lm_boft.py under `configs/accelerate/deepspeed_zero3.yaml` on one GPU (DeepSpeed's CUDA
    accelerator and its engine, the model loaded partitioned): the fp32 run equals the plain one (≤ 1e-4), a
    bf16 run keeps its loss falling and its saved adapter fp32."""
    import json

    from conftest import accelerate_launch, lm_script_args
    from safetensors.torch import load_file

    pytest.importorskip("deepspeed")  # a dev dependency; a machine given only the wheels of some may lack it
    plain, zero3, bf16 = tmp_path / "plain", tmp_path / "zero3", tmp_path / "bf16"
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, plain), processes=1, device="cuda")
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, zero3), "deepspeed_zero3", processes=1,
                      device="cuda", report=tmp_path / "report")
    report = (tmp_path / "report.0").read_text()
    assert "DistributedType.DEEPSPEED fsdp_version=None processes=1 zero_stage=3" in report
    ours, theirs = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (zero3, plain))
    assert ours.keys() == theirs.keys() and all((ours[k] - theirs[k]).abs().max() <= 1e-4 for k in theirs)
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, bf16), "deepspeed_zero3", processes=1,
                      device="cuda", mixed_precision="bf16")
    losses = json.loads((bf16 / "results.json").read_text())["losses"]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert all(t.dtype == torch.float32 for t in load_file(bf16 / "adapter" / "adapter_model.safetensors").values())
