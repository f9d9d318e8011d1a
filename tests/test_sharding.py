"""Data-parallel training: every adapter under FSDP2, FSDP1 and DDP (2 processes over gloo, blocks
wrapped as users wrap them) gives the one-process run's losses and saved adapter; the saved adapter
loads into an unsharded model and into PEFT; adapters cannot be added after wrapping. The scripts under
accelerate's FSDP plugin (shipped configs) equal their DDP runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SD_ADAPTER_SIZES, accelerate_launch, free_port, lm_script_args, write_instance_images
from safetensors.torch import load_file

import boftvision as bv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import sharded_run  # noqa: E402

KINDS = ["fsdp2", "fsdp1", "ddp", "zero2", "zero3", "zero3init"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # DeepSpeed builds its CPU op with the venv's ninja
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_run.py"), "--kinds", *KINDS, "--out", str(out),
                          "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded_run.train("single", out)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one(runs, kind):
    single = json.loads((runs / "single" / "losses.json").read_text())
    sharded = json.loads((runs / kind / "losses.json").read_text())
    assert sorted(sharded) == sorted(f"{m}-{a}" for m, a in sharded_run.runs_of(kind)) and len(single) == 10
    for run in sharded:  # {llama, unet} × 4 adapters (+ GPT-2's Conv1D × LoRA, BOFT under zero3init)
        assert sharded[run] == pytest.approx(single[run], abs=1e-5), run
        ours, theirs = load_file(str(runs / "single" / run / "adapter_model.safetensors")), \
            load_file(str(runs / kind / run / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs), run
        for key in ours:
            torch.testing.assert_close(theirs[key], ours[key], atol=1e-5, rtol=1e-5, msg=f"{run} {key}")
    assert single["llama-lora"][-1] < single["llama-lora"][0]  # the runs trained


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_deepspeed_bf16_saves_the_optimizers_fp32_weights(runs, kind):
    """Under DeepSpeed's bf16 the module holds bf16 copies of the adapter; the saved adapter is the
    optimizer's fp32 weights, exactly (it was the bf16 copy, 5e-4 off, before). Adding adapters to the
    DeepSpeed engine is refused with the fix."""
    result = json.loads((runs / kind / "bf16.json").read_text())
    refused = result.pop("refused")
    assert result == {"module": "torch.bfloat16", "saved": ["torch.float32"], "difference": 0.0}
    assert refused and "DeepSpeedEngine at the root" in refused and "add adapters to the plain model first" in refused


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
    """configs/accelerate/*.yaml read by accelerate's own loader (the scripts run under them below,
    through tests/accelerate_sharded_cpu.py, and unchanged on a GPU in tests/test_gpu.py)."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp1", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"}
    assert configs["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp1"].fsdp_config["fsdp_version"] == 1 and configs["fsdp1"].fsdp_config["fsdp_use_orig_params"]


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1", "zero2", "zero3"])
def test_sharded_checkpoint_resumes_to_the_uninterrupted_run(runs, kind):
    """Adam, 2 steps, save_checkpoint (gathered, process 0 writes), a fresh wrapped model and optimizer
    load it (each process keeps its shards / its ZeRO partition), steps 3 and 4 equal the run that never
    stopped (step 4's loss shows that the Adam moments came back)."""
    result = json.loads((runs / kind / "resume.json").read_text())
    for method, run in result.items():
        assert run["resumed"] == pytest.approx(run["straight"][2:], abs=1e-6), method
        assert run["straight"][3] < run["straight"][0]
    state = torch.load(runs / kind / "run-boft" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["sharded"] and len(state["rng"]) == 2
    assert all("_fsdp_wrapped_module" not in name for name in state["trainable"])


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1", "single"])
def test_checkpoints_resume_with_another_process_count_or_engine(runs, kind):
    """A two-process FSDP run's checkpoint (whole tensors by name) resumes in one process, unsharded or under
    FSDP2, and a one-process run's checkpoint under FSDP2: steps 3 and 4 equal the uninterrupted run's (the
    two-process DDP-equivalent run of resume.json); a changed process count is said, for the RNG states."""
    import torch.distributed as dist

    straight = json.loads((runs / "fsdp2" / "resume.json").read_text())["boft"]["straight"]
    if kind != "single":
        losses, said = sharded_run.resume_elsewhere(kind, runs, "single")
        assert losses == pytest.approx(straight[2:], abs=1e-6)
        assert len(said) == 1 and "written by 2 process(es) and this run has 1" in said[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        losses, said = sharded_run.resume_elsewhere(kind, runs, "fsdp2")
    finally:
        dist.destroy_process_group()
    assert losses == pytest.approx(straight[2:], abs=1e-6)
    assert len(said) == (kind != "single")


# --- the scripts under accelerate launch: its FSDP plugin against its DDP, two CPU processes ---------------
def adapters_of(out: Path) -> dict:
    return {f.relative_to(out).as_posix(): load_file(f) for f in sorted(out.rglob("adapter_model.safetensors"))
            if not any(part.startswith("checkpoint-") for part in f.relative_to(out).parts)}


def assert_same_run(run: Path, reference: Path, tolerance: float = 1e-5) -> None:
    ours, theirs = adapters_of(run), adapters_of(reference)
    assert ours.keys() == theirs.keys() and ours
    for part, tensors in theirs.items():
        assert ours[part].keys() == tensors.keys()
        for key, value in tensors.items():
            assert (ours[part][key] - value).abs().max() <= tolerance, (part, key)
    result, expected = (json.loads((p / "results.json").read_text()) for p in (run, reference))
    assert result["processes"] == expected["processes"] == 2
    assert result["losses"] == pytest.approx(expected["losses"], abs=tolerance)


def assert_sharded_by_accelerate(report: Path, version: int, block: str) -> None:
    for rank in (0, 1):
        line = Path(f"{report}.{rank}").read_text().splitlines()[0]
        assert f"DistributedType.FSDP fsdp_version={version} processes=2" in line, line
        wrapped = f"FSDP{block}" if version == 2 else "FullyShardedDataParallel"
        assert wrapped in line.split("modules=")[1].split(","), line


@pytest.fixture(scope="module")
def lm_ddp(lm_run_inputs, tmp_path_factory):
    """train_lm_boft.py under accelerate's DDP (two CPU processes): the reference of the sharded runs."""
    out = tmp_path_factory.mktemp("lm-ddp")
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, out))
    assert json.loads((out / "results.json").read_text())["steps"] == 6  # 48 rows / (2 × 4)
    return out


def test_lm_script_under_accelerates_fsdp_equals_ddp(lm_run_inputs, lm_ddp, tmp_path):
    """train_lm_boft.py unchanged under `accelerate launch --config_file configs/accelerate/fsdp{1,2}.yaml`
    (decoder layers auto-wrapped, adapter gathered and written by process 0) trains exactly as under
    accelerate's DDP: same losses, same saved adapter; the data is split over the two processes."""
    for version in (2, 1):
        out = tmp_path / f"fsdp{version}"
        accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, out), f"fsdp{version}",
                          report=tmp_path / f"report{version}")
        assert_sharded_by_accelerate(tmp_path / f"report{version}", version, "LlamaDecoderLayer")
        assert_same_run(out, lm_ddp)


def assert_run_by_deepspeed(report: Path, stage: int) -> None:
    for rank in (0, 1):
        line = Path(f"{report}.{rank}").read_text().splitlines()[0]
        assert f"DistributedType.DEEPSPEED fsdp_version=None processes=2 zero_stage={stage}" in line, line
        assert "DeepSpeedEngine" in line.split("modules=")[1].split(","), line


@pytest.fixture(scope="module")
def lm_zero3(lm_run_inputs, tmp_path_factory):
    """train_lm_boft.py under configs/accelerate/deepspeed_zero3.yaml, a checkpoint at step 3."""
    out = tmp_path_factory.mktemp("lm-zero3")
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, out / "run", "--checkpointing_steps", "3"),
                      "deepspeed_zero3", report=out / "report")
    return out


def test_lm_script_under_accelerates_deepspeed_zero3_equals_ddp(lm_zero3, lm_ddp):
    """train_lm_boft.py unchanged under `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`
    (transformers loads the Llama partitioned, under zero.Init; the adapters are added to it) trains as under
    DDP; its checkpoint holds every process's ZeRO partition, written by process 0."""
    assert_run_by_deepspeed(lm_zero3 / "report", 3)
    assert_same_run(lm_zero3 / "run", lm_ddp)
    state = torch.load(lm_zero3 / "run" / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert state["deepspeed"] and len(state["optimizer"]["deepspeed_parts"]) == 2 and len(state["rng"]) == 2


@pytest.mark.slow  # ~20 s; `make test-all` (the resume itself is in the default suite: sharded_run's zero2/zero3)
def test_lm_script_under_accelerates_deepspeed_zero3_resumes(lm_run_inputs, lm_zero3, tmp_path):
    """A run resumed from the ZeRO-3 run's step-3 checkpoint ends on the same adapter."""
    out = lm_zero3 / "run"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, resumed, "--checkpointing_steps", "3",
                                                         "--resume_from_checkpoint", "latest"), "deepspeed_zero3")
    assert_same_run(resumed, out, tolerance=1e-6)


@pytest.mark.slow
def test_lm_script_under_accelerates_deepspeed_zero2_equals_ddp(lm_run_inputs, lm_ddp, tmp_path):
    """The same under `configs/accelerate/deepspeed_zero2.yaml` (the optimizer's state split, the model whole)."""
    out = tmp_path / "zero2"
    accelerate_launch("train_lm_boft.py", lm_script_args(lm_run_inputs, out), "deepspeed_zero2",
                      report=tmp_path / "report")
    assert_run_by_deepspeed(tmp_path / "report", 2)
    assert_same_run(out, lm_ddp)


def dreambooth_args(tiny_sd, folder, out, *extra):
    """A short DreamBooth run whose sharded and DDP runs are comparable: dropout off, AdamW with a large ε
    (float noise in near-zero gradients is not turned into ±lr steps), checkpoints at steps 2 and 4."""
    return ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(folder / "instance"),
            "--instance_prompt", "a photo of sks shape", "--output_dir", str(out), "--seed", "0",
            "--train_batch_size", "2", "--learning_rate", "0.05", "--adam_epsilon", "1", "--boft_dropout", "0",
            "--max_train_steps", "4", "--checkpointing_steps", "2", *SD_ADAPTER_SIZES, *extra]


UNET_AND_TEXT_BLOCKS = "BasicTransformerBlock,ResnetBlock2D,CLIPEncoderLayer"


@pytest.fixture(scope="module")
def dreambooth_runs(tiny_sd, tmp_path_factory):
    """DreamBooth with --train_text_encoder in two processes under DDP, FSDP2 and FSDP1."""
    folder = tmp_path_factory.mktemp("dreambooth-accelerate")
    write_instance_images(folder / "instance", 4)
    text = ("--train_text_encoder",)
    accelerate_launch("train_dreambooth_boft.py", dreambooth_args(tiny_sd, folder, folder / "ddp", *text))
    for version in (2, 1):
        out = folder / f"fsdp{version}"
        accelerate_launch("train_dreambooth_boft.py", dreambooth_args(tiny_sd, folder, out, *text), f"fsdp{version}",
                          UNET_AND_TEXT_BLOCKS, report=folder / f"report{version}")
    return folder


@pytest.mark.parametrize("version", [2, 1])
def test_dreambooth_script_under_accelerates_fsdp_equals_ddp(dreambooth_runs, version):
    """train_dreambooth_boft.py --train_text_encoder under accelerate's FSDP2 and FSDP1 (the UNet and the
    text encoder prepared as one model, the blocks of both auto-wrapped) equals its DDP run: adapters,
    losses, checkpoints."""
    out = dreambooth_runs / f"fsdp{version}"
    assert_sharded_by_accelerate(dreambooth_runs / f"report{version}", version, "CLIPEncoderLayer")
    assert_same_run(out, dreambooth_runs / "ddp")
    assert sorted(adapters_of(out)) == ["text_encoder/adapter_model.safetensors", "unet/adapter_model.safetensors"]
    for run in (out, dreambooth_runs / "ddp"):  # (the DDP run is also the default suite's two-process run)
        result = json.loads((run / "results.json").read_text())
        assert result["steps"] == 4 and result["checkpoints"] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow  # ~15 s; `make test-all`
def test_dreambooth_script_under_accelerates_deepspeed_zero3_equals_ddp(dreambooth_runs, tiny_sd):
    """The same under configs/accelerate/deepspeed_zero3.yaml: the UNet and the text encoder prepared as one
    DeepSpeed engine (accelerate's DeepSpeed takes one model), every parameter partitioned."""
    out = dreambooth_runs / "zero3"
    accelerate_launch("train_dreambooth_boft.py",
                      dreambooth_args(tiny_sd, dreambooth_runs, out, "--train_text_encoder"), "deepspeed_zero3",
                      report=dreambooth_runs / "report-zero3")
    assert_run_by_deepspeed(dreambooth_runs / "report-zero3", 3)
    assert_same_run(out, dreambooth_runs / "ddp")
    assert json.loads((out / "results.json").read_text())["checkpoints"] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow  # ~45 s; `make test-all`
def test_dreambooth_script_under_fsdp_resumes_and_trains_the_unet_alone(dreambooth_runs, tiny_sd, tmp_path):
    """The FSDP2 run resumed from its step-2 checkpoint ends where the uninterrupted one did; the UNet
    alone (prepared by itself) under FSDP2 equals its DDP run."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(dreambooth_runs / "fsdp2", cut)
    for later in ("checkpoint-4", "unet", "text_encoder", "results.json"):
        shutil.rmtree(cut / later) if (cut / later).is_dir() else (cut / later).unlink()
    accelerate_launch("train_dreambooth_boft.py", dreambooth_args(
        tiny_sd, dreambooth_runs, cut, "--train_text_encoder", "--resume_from_checkpoint", "latest"), "fsdp2",
        UNET_AND_TEXT_BLOCKS)
    assert_same_run(cut, dreambooth_runs / "fsdp2", tolerance=1e-6)

    accelerate_launch("train_dreambooth_boft.py", dreambooth_args(tiny_sd, dreambooth_runs, tmp_path / "unet-ddp"))
    accelerate_launch("train_dreambooth_boft.py", dreambooth_args(tiny_sd, dreambooth_runs, tmp_path / "unet-fsdp2"),
                      "fsdp2", "BasicTransformerBlock,ResnetBlock2D", report=tmp_path / "unet-report")
    assert_sharded_by_accelerate(tmp_path / "unet-report", 2, "BasicTransformerBlock")
    assert_same_run(tmp_path / "unet-fsdp2", tmp_path / "unet-ddp")


def test_parts_are_called_through_the_whole():
    """Part(whole, name) runs the whole's forward (where a sharded root gathers its parameters), gives the
    part's output, and reads attributes from the part."""
    import copy

    from boftvision.sharding import Part, Parts

    whole = Parts({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 4)})
    calls = []
    whole.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    x = torch.randn(5, 3)
    a, b = Part(whole, "a"), Part(whole, "b")
    assert torch.equal(a(x), whole["a"](x)) and b(x).shape == (5, 4) and calls == ["a", "b"]
    assert a.out_features == 2 and a.module is whole["a"] and copy.copy(b).name == "b"


def test_glue_script_under_deepspeed_zero3_trains_its_head_as_under_ddp(tmp_path):
    """train_glue_boft.py on a BERT saved without its classifier, so the head is created when the model loads
    (under ZeRO-3: partitioned, by transformers' zero.Init) and trained whole as ``modules_to_save``: the
    copy for training is taken from the gathered head (a plain copy held the empty partitions, and the run
    died in DeepSpeed's parameter fetch). Same losses, same saved adapter and head as under DDP."""
    sys.path.insert(0, str(ROOT / "demos"))
    from minilm_glue_example import negation_rows, write_csv
    from test_language import tiny, tokenizer_dir

    tiny("bert").bert.save_pretrained(tmp_path / "bert")
    tokenizer_dir(tmp_path / "bert", "bert")
    train = write_csv(negation_rows(64, 0), tmp_path / "train.csv")
    dev = write_csv(negation_rows(32, 1), tmp_path / "dev.csv")
    runs = {}
    for engine in ("ddp", "deepspeed_zero3"):
        out = tmp_path / engine
        accelerate_launch("train_glue_boft.py", [
            "--model_name_or_path", str(tmp_path / "bert"), "--train_file", str(train), "--validation_file", str(dev),
            "--train_batch_size", "16", "--learning_rate", "3e-2", "--adapter", "lora", "--epochs", "2",
            "--output_dir", str(out)], engine)
        runs[engine] = (json.loads((out / "results.json").read_text())["runs"][0]["history"], adapters_of(out))
    (history, saved), (expected_history, expected) = runs["deepspeed_zero3"], runs["ddp"]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in expected_history], abs=1e-5)
    assert saved.keys() == expected.keys() and saved
    for part, tensors in expected.items():
        assert any("classifier" in key for key in tensors) and saved[part].keys() == tensors.keys()
        for key, value in tensors.items():
            torch.testing.assert_close(saved[part][key], value, atol=1e-5, rtol=1e-5, msg=key)
