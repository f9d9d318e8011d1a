"""ControlNet-style training on a tiny pipeline built here (random weights) with generated shape-position
triplets: loss falls per adapter, resume is exact, bad data is refused; the control-error metrics on
hand-made masks; the bundled control adapter of the embedded model beats the base model's error."""
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SD_ADAPTER_SIZES, accelerate_launch
from PIL import Image

from boftvision.adapters import METHODS
from boftvision.data.controlnet import read_metadata, write_triplets
from boftvision.data.shapes import control_example
from boftvision.generate import control_features, generate
from boftvision.integrations.diffusers import (
    EMBEDDED,
    EMBEDDED_CONTROL,
    ControlEncoder,
    attach_adapters,
    control_signal,
    load_pipeline,
)
from boftvision.metrics.control import landmark_error, mask_iou_error

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import eval_control  # noqa: E402
import train_controlnet_boft  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("control")
    (root / "model").symlink_to(tiny_sd, target_is_directory=True)
    rng = np.random.default_rng(0)
    write_triplets(root / "train", [control_example(rng, 32) for _ in range(4)])
    return root


def args(root, out, *extra):
    return ["--pretrained_model_name_or_path", str(root / "model"), "--train_data_dir", str(root / "train"),
            "--output_dir", str(out), "--learning_rate", "1e-2", "--train_batch_size", "4", "--seed", "0",
            *SD_ADAPTER_SIZES, *extra]


@pytest.mark.parametrize("adapter", list(METHODS))
def test_control_training_loss_falls(setup, tmp_path, adapter):
    result = train_controlnet_boft.main(args(setup, tmp_path, "--adapter", adapter, "--max_train_steps", "20",
                                             "--checkpointing_steps", "20"))
    losses = result["losses"]
    assert statistics.mean(losses[-5:]) < 0.95 * statistics.mean(losses[:5])
    assert (tmp_path / "unet" / "adapter_model.safetensors").is_file()
    encoder = ControlEncoder.load(tmp_path)
    assert encoder.out.weight.abs().max() > 0  # the zero-initialised output conv trained


def test_control_changes_the_unet_only_through_features(setup):
    pipe = load_pipeline(setup / "model")
    encoder = ControlEncoder.for_unet(pipe.unet, pipe.vae_scale_factor)
    control = torch.rand(1, 3, 32, 32)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 16, 32)
    with torch.no_grad():
        plain = pipe.unet(x, t, context).sample
        with control_signal(pipe.unet, encoder(control)):  # zero-initialised: no change, batch repeated
            same = pipe.unet(x, t, context).sample
        torch.nn.init.normal_(encoder.out.weight, std=0.1)
        with control_signal(pipe.unet, encoder(control)):
            changed = pipe.unet(x, t, context).sample
        after = pipe.unet(x, t, context).sample  # the hook is gone after the block
    torch.testing.assert_close(same, plain, atol=0, rtol=0)
    torch.testing.assert_close(after, plain, atol=0, rtol=0)
    assert (changed - plain).abs().max() > 1e-3


def test_control_resume_is_exact(setup, tmp_path):
    full = train_controlnet_boft.main(args(setup, tmp_path / "full", "--max_train_steps", "8",
                                           "--checkpointing_steps", "4"))
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "cut" / "checkpoint-4")
    resumed = train_controlnet_boft.main(args(setup, tmp_path / "cut", "--max_train_steps", "8",
                                              "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"))
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)
    a, b = ControlEncoder.load(tmp_path / "full"), ControlEncoder.load(tmp_path / "cut")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)


def test_bad_control_data(tmp_path):
    rng = np.random.default_rng(1)
    folder = write_triplets(tmp_path / "d", [control_example(rng, 32) for _ in range(2)])
    (folder / "conditioning_images" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="line 2: conditioning_image file .*00001.png is missing"):
        read_metadata(folder)
    folder = write_triplets(tmp_path / "e", [control_example(rng, 32) for _ in range(2)])
    Image.new("RGB", (16, 16)).save(folder / "conditioning_images" / "00000.png")
    with pytest.raises(ValueError, match="is 32×32 but conditioning image 00000.png is 16×16"):
        read_metadata(folder)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_metadata(tmp_path)


def test_control_metrics_on_known_masks():
    a = np.zeros((10, 10), bool)
    a[:5] = True  # 50 pixels
    b = np.zeros((10, 10), bool)
    b[:, :5] = True  # 50 pixels, 25 shared → IoU 25/75
    assert mask_iou_error(a, a) == 0.0
    assert mask_iou_error(a, b) == pytest.approx(1 - 25 / 75)
    assert mask_iou_error(a, ~a) == 1.0
    target = [np.zeros((68, 2)), np.zeros((68, 2))]
    detect = iter([np.full((68, 2), 3.0), None]).__next__  # 3-4-5: one face found, one missed
    scores = landmark_error(lambda image: detect(), [np.zeros((4, 4, 3))] * 2, target)
    assert scores["landmark_error"] == pytest.approx(np.sqrt(18)) and scores["detection_rate"] == 0.5


def test_bundled_control_adapter_beats_the_base_model(tmp_path):
    """The embedded model's bundled shape-position adapter (docs/diffusion.md) puts the object where the
    control says: its mask error is lower than the base model's on held-out controls."""
    rng = np.random.default_rng(123)
    folder = write_triplets(tmp_path / "test", [control_example(rng, 32) for _ in range(8)])
    result = eval_control.main(["--adapter_path", str(EMBEDDED_CONTROL), "--data_dir", str(folder),
                                "--num_inference_steps", "10", "--compare_base", "--out", str(tmp_path / "r.json")])
    assert result["adapted"]["mask_error"] < result["base"]["mask_error"] - 0.1
    assert json.loads((tmp_path / "r.json").read_text()) == result
    pipe = load_pipeline(EMBEDDED)
    image = generate(pipe, "a photo of a red circle", 0, 10,
                     control=control_features(pipe, EMBEDDED_CONTROL, folder / "conditioning_images" / "00000.png"))
    assert image[0].size == (32, 32)


@pytest.mark.slow  # the default suite runs the script in two processes in the DDP-against-FSDP test below
def test_control_accelerate_launch_two_processes(setup, tmp_path):
    accelerate_launch("train_controlnet_boft.py", args(
        setup, tmp_path, "--max_train_steps", "4", "--train_batch_size", "1", "--checkpointing_steps", "2"))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["processes"] == 2  # two processes really shared the run (not two lone ones)
    assert result["steps"] == 4 and result["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert ControlEncoder.load(tmp_path).out.weight.abs().max() > 0


def test_control_lora_output_loads_in_diffusers(setup, tmp_path):
    """A LoRA control run also writes diffusers' LoRA file (the UNet part: load_lora_weights gives the
    UNet we trained) and, with --save_merged, a pipeline folder with that UNet merged."""
    from diffusers import StableDiffusionPipeline

    train_controlnet_boft.main(args(setup, tmp_path, "--adapter", "lora", "--max_train_steps", "3",
                                    "--learning_rate", "5e-2", "--save_merged"))
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 16, 32, generator=g)

    def unet_out(unet):
        with torch.no_grad():
            return unet(x, torch.tensor([10]), context).sample

    ours = load_pipeline(setup / "model")
    attach_adapters(ours, tmp_path)
    theirs = load_pipeline(setup / "model")
    theirs.load_lora_weights(str(tmp_path))
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert (unet_out(ours.unet) - unet_out(load_pipeline(setup / "model").unet)).abs().max() > 1e-4
    torch.testing.assert_close(unet_out(theirs.unet), unet_out(ours.unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet_out(merged.unet), unet_out(ours.unet), atol=1e-5, rtol=1e-5)


def control_run(setup, out, *engine):
    """Three steps of the control script in two processes, a checkpoint at step 2 (dropout off, AdamW
    ε = 1: float noise in near-zero gradients is not turned into ±lr steps); the saved UNet adapter and
    control encoder."""
    from safetensors.torch import load_file

    accelerate_launch("train_controlnet_boft.py", args(
        setup, out, "--max_train_steps", "3", "--train_batch_size", "2", "--boft_dropout", "0",
        "--adam_epsilon", "1", "--learning_rate", "0.05", "--checkpointing_steps", "2"), *engine)
    files = [out / "unet" / "adapter_model.safetensors", out / "control_encoder.safetensors"]
    return {f.name: load_file(f) for f in files}, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def control_ddp(setup, tmp_path_factory):
    return control_run(setup, tmp_path_factory.mktemp("control-ddp") / "out")


@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("fsdp1", marks=pytest.mark.slow), "deepspeed_zero3"])
def test_control_script_under_accelerates_fsdp_equals_ddp(setup, control_ddp, tmp_path, engine):
    """Under accelerate's FSDP or DeepSpeed ZeRO-3 (tests/accelerate_sharded_cpu.py; the UNet and the control
    encoder prepared as one model) two processes train exactly as under DDP: the UNet adapter and the control
    encoder saved from the shards / partitions equal DDP's."""
    expected, expected_result = control_ddp
    wrap = "BasicTransformerBlock,ResnetBlock2D" if engine.startswith("fsdp") else None
    tensors, result = control_run(setup, tmp_path / engine, engine, wrap)
    assert result["processes"] == expected_result["processes"] == 2
    assert result["losses"] == pytest.approx(expected_result["losses"], abs=1e-5)
    assert result["steps"] == expected_result["steps"] == 3
    assert result["checkpoints"] == expected_result["checkpoints"] == ["checkpoint-2"]
    for name, reference in expected.items():
        assert tensors[name].keys() == reference.keys()
        assert all((tensors[name][k] - v).abs().max() <= 1e-5 for k, v in reference.items()), name
    assert any(v.abs().max() > 0 for v in expected["control_encoder.safetensors"].values())
