"""Tiny models built here: no network, no weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import boftvision as bv


class TinyNet(nn.Module):
    """Two Linear layers and two Conv2d layers; widths chosen so every method's defaults below fit."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.tanh(self.fc1(x))), self.conv2(torch.tanh(self.conv1(img)))


LINEAR = ["fc1", "fc2"]
CONV = ["conv1", "conv2"]

# method -> config factory (targets, init_weights); sizes divide every targeted width of TinyNet
CONFIGS = {
    "lora": lambda t, init=True: bv.LoRAConfig(r=4, alpha=8, target_modules=t, init_weights=init),
    "vblora": lambda t, init=True: bv.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=t,
                                                    init_logits_std=1.0, init_vector_bank_bound=0.5,
                                                    init_weights=init),
    "oft": lambda t, init=True: bv.OFTConfig(block_size=8, use_cayley_neumann=False, target_modules=t,
                                             init_weights=init),
    "boft": lambda t, init=True: bv.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=t,
                                               init_weights=init),
}
METHODS = list(CONFIGS)
assert set(METHODS) == set(bv.adapters.METHODS), "every registered method needs a test config here"


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, 32, generator=g), torch.randn(2, 8, 6, 6, generator=g)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Scripts run in-process create an Accelerator; its state is a process-wide singleton that would
    carry one test's mixed precision into the next. Reset it after each test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# --- tiny Stable Diffusion (the embedded model's architecture, random weights) ----------------------
# adapter sizes that divide every targeted width of the tiny UNet (32/64) and text encoder (32)
SD_ADAPTER_SIZES = ["--boft_block_size", "4", "--oft_block_size", "8", "--vblora_vector_length", "8",
                    "--vblora_num_vectors", "32"]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A saved tiny pipeline (diffusers layout), built once per session."""
    from boftvision.data.shapes import WORDS
    from boftvision.integrations.diffusers import pipeline_from_components, tiny_components

    path = tmp_path_factory.mktemp("tiny-sd") / "model"
    pipeline_from_components(tiny_components(WORDS, seed=0)).save_pretrained(str(path))
    return path


def accelerate_command(script, script_args, engine: str = "ddp", wrap: str | None = None, report=None,
                       processes: int = 2, device: str = "cpu", mixed_precision: str = "no",
                       nan_loss_at: int | None = None) -> tuple[list, dict]:
    """``(command, env)`` that runs a training script under ``accelerate launch``. Default: two CPU
    processes over gloo.

    ``engine``: "ddp" (accelerate's multi-process launch), or the name of a shipped
    ``configs/accelerate/*.yaml`` ("fsdp1", "fsdp2", "deepspeed_zero2", "deepspeed_zero3") or a config file's
    path, run through ``tests/accelerate_sharded_cpu.py`` (on CPU it turns accelerate's FSDP or DeepSpeed on,
    which accelerate enables only for accelerator devices; on CUDA it only reports), with ``wrap`` as FSDP's
    auto-wrapped block classes; on CPU FSDP1's ``sync_module_states`` is off (not supported there).
    ``report``: a path prefix each process writes what accelerate prepared to (``<report>.<rank>``).
    ``nan_loss_at``: process 0's loss is NaN at that call of ``F.cross_entropy`` (through the same shim).
    """
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # DeepSpeed's ninja
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # torchrun's processes on CPU + gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", mixed_precision,
               "--dynamo_backend", "no"]
    shim = engine != "ddp" or nan_loss_at is not None
    target = [str(root / "tests" / "accelerate_sharded_cpu.py")] * shim + [str(root / "train_scripts" / script)]
    if nan_loss_at is not None:
        env["BOFTVISION_NAN_LOSS_AT"] = str(nan_loss_at)
    if engine == "ddp":
        command += ["--multi_gpu"] if processes > 1 else []
    else:
        config = Path(engine) if engine.endswith(".yaml") else root / "configs" / "accelerate" / f"{engine}.yaml"
        command += ["--config_file", str(config)]
        command += ["--fsdp_sync_module_states", "false"] if engine == "fsdp1" and device == "cpu" else []
        command += ["--fsdp_transformer_layer_cls_to_wrap", wrap] if wrap else []
        if report:
            env["BOFTVISION_ENGINE_REPORT"] = str(report)
    return [*command, *target, *script_args], env


def accelerate_launch(script, script_args, *engine, **options) -> None:
    """Run :func:`accelerate_command` to the end; fail with its stderr."""
    import subprocess

    command, env = accelerate_command(script, script_args, *engine, **options)
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="session")
def lm_run_inputs(tmp_path_factory):
    """A tiny Llama with its tokenizer, and 48 instruction rows (6 optimizer steps at 2 × 4)."""
    import json

    from test_language import NEGATIVE, POSITIVE, SUBJECTS, tiny, tokenizer_dir

    root = tmp_path_factory.mktemp("lm-accelerate")
    tiny("llama").save_pretrained(root / "llama")
    tokenizer_dir(root / "llama", "word")
    rows = [{"prompt": f"question {s} was {a} .", "response": f"answer {'yes' if a in POSITIVE else 'no'}"}
            for s in SUBJECTS for a in POSITIVE[:2] + NEGATIVE[:2]]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def lm_script_args(inputs, out, *extra) -> list[str]:
    """train_lm_boft.py on :func:`lm_run_inputs`: one epoch, batch 4, BOFT b=4 without dropout."""
    return ["--pretrained_model_name_or_path", str(inputs / "llama"), "--train_file", str(inputs / "train.jsonl"),
            "--num_train_epochs", "1", "--train_batch_size", "4", "--learning_rate", "1e-2", "--boft_block_size", "4",
            "--boft_dropout", "0", "--output_dir", str(out), *extra]


def write_instance_images(folder, n: int = 2):
    """``n`` views of the bundled DreamBooth subject (32 px) saved as 0.png, 1.png, … in ``folder``."""
    from boftvision.data.shapes import instance_images

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(instance_images(n, 32)):
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def instance(tmp_path_factory):
    """Two images of the bundled DreamBooth subject: an --instance_data_dir."""
    return write_instance_images(tmp_path_factory.mktemp("instance"))


# --- lycoris-lora, the reference LyCORIS implementation (ComfyUI/AUTOMATIC1111/kohya's format) -------
LYCORIS_PRESET = {  # its default ("full") names time_embedding.linear_1 twice on diffusers UNets
    "enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"], "unet_target_name": [],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"], "text_encoder_target_name": [],
}


def apply_lycoris_file(pipe, path):
    """lycoris-lora's network from a LyCORIS file applied to the pipeline's UNet and text encoder, as
    kohya's loader does it; fails when lycoris-lora leaves a module of the file out."""
    from lycoris import kohya

    kohya.LycorisNetworkKohya.apply_preset(LYCORIS_PRESET)  # its targets are class state
    network, weights = kohya.create_network_from_weights(1.0, str(path), None, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    assert len(network.loras) == len({k.split(".")[0] for k in weights}), "lycoris-lora skipped modules"
    return network


def free_port() -> int:
    """A TCP port nobody listens on now (process groups, the demo's server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
