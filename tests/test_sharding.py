"""Data-parallel training: every adapter under FSDP2, FSDP1 and DDP (2 processes over gloo, blocks
wrapped as users wrap them) gives the one-process run's losses and saved adapter; the saved adapter
loads into an unsharded model and into PEFT; adapters cannot be added after wrapping."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

import boftvision as bv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import sharded_run  # noqa: E402

KINDS = ["fsdp2", "fsdp1", "ddp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_run.py"), "--kinds", *KINDS, "--out", str(out),
                          "--port", str(free_port())], env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                                            "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded_run.train("single", out)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one(runs, kind):
    single = json.loads((runs / "single" / "losses.json").read_text())
    sharded = json.loads((runs / kind / "losses.json").read_text())
    assert sorted(sharded) == sorted(single) and len(single) == 8  # {llama, unet} × 4 adapters
    for run, losses in single.items():
        assert sharded[run] == pytest.approx(losses, abs=1e-5), run
        ours, theirs = load_file(str(runs / "single" / run / "adapter_model.safetensors")), \
            load_file(str(runs / kind / run / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs), run
        for key in ours:
            torch.testing.assert_close(theirs[key], ours[key], atol=1e-5, rtol=1e-5, msg=f"{run} {key}")
    assert single["llama-lora"][-1] < single["llama-lora"][0]  # the runs trained


@pytest.mark.parametrize("method", ["lora", "oft", "boft"])
def test_sharded_adapter_loads_unsharded_and_in_peft(runs, method):
    from peft import PeftModel

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    reference, _ = sharded_run.build_llama()
    bv.load_adapter(reference, runs / "single" / f"llama-{method}")
    torch.manual_seed(0)
    ours, _ = sharded_run.build_llama()
    bv.load_adapter(ours, runs / "fsdp2" / f"llama-{method}")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    if method == "boft":
        return  # m = 2: stock PEFT builds one factor only (see test_peft_compat)
    torch.manual_seed(0)
    base, _ = sharded_run.build_llama()
    theirs = PeftModel.from_pretrained(base, str(runs / "fsdp1" / f"llama-{method}"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_adapters_go_in_before_wrapping(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for wrap in (lambda m: fully_shard(m), lambda m: torch.nn.parallel.DistributedDataParallel(m)):
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
            wrapped = wrap(model)
            with pytest.raises(ValueError, match="add adapters to the plain model first, then wrap"):
                bv.add_adapter(wrapped, bv.LoRAConfig(r=2, target_modules=["0"]))
            assert not bv.inject.adapter_configs(model)
    finally:
        dist.destroy_process_group()


def test_validation_during_a_sharded_run_is_refused():
    """The step loop refuses validation images on a sharded model (process 0 alone cannot run FSDP's
    forward) before training, naming the fix — instead of hanging in a collective."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from boftvision.training.loop import train_steps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["0"]))
        fully_shard(model)
        with pytest.raises(ValueError, match="leave out --validation_prompt"):
            train_steps(None, None, model, [model], None, None, [], lambda batch: None, validate=lambda step: None)
    finally:
        dist.destroy_process_group()


def test_shipped_accelerate_configs_parse():
    """configs/accelerate/*.yaml read by accelerate's own loader (its FSDP launch needs GPUs: the
    scripts under it are checked on a GPU machine, see docs/distributed.md)."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp1", "fsdp2"}
    assert configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp1"].fsdp_config["fsdp_version"] == 1 and configs["fsdp1"].fsdp_config["fsdp_use_orig_params"]


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_sharded_checkpoint_resumes_to_the_uninterrupted_run(runs, kind):
    """Adam, 2 steps, save_checkpoint (gathered, process 0 writes), a fresh wrapped model and optimizer
    load it (each process keeps its shards), step 3 equals the run that never stopped."""
    result = json.loads((runs / kind / "resume.json").read_text())
    for method, run in result.items():
        assert run["resumed"] == pytest.approx(run["straight"][2], abs=1e-6), method
        assert run["straight"][2] < run["straight"][0]
    state = torch.load(runs / kind / "run-boft" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["sharded"] and len(state["rng"]) == 2
    assert all("_fsdp_wrapped_module" not in name for name in state["trainable"])
