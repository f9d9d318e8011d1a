"""Runs that survive faults (docs/reliability.md): kills at random moments, preemption signals,
divergence, incomplete checkpoints, resumes with other settings, bad files, unwritable folders.
The runs are ``tests/fault_run.py``: the step loop every step-based script uses."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, LINEAR
from PIL import Image
from safetensors.torch import load_file

import boftvision as bv
from boftvision.data.dreambooth import list_images
from boftvision.training import (
    TrainingDiverged,
    claim_output_dir,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import fault_run  # noqa: E402

STEPS = 24


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "fault_run.py"), "--output_dir", str(out), "--max_train_steps", str(STEPS),
            "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2", *extra]


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent)}
    return subprocess.Popen(command(out, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's adapter."""
    out = tmp_path_factory.mktemp("reference")
    fault_run.main(command(out)[2:])
    return adapter(out)


def assert_everything_loads(out: Path) -> None:
    """No kill ever leaves an output that fails to load: the checkpoint `latest` picks, every complete
    checkpoint, and the adapter folder when there is one."""
    model = bv.add_adapter(fault_run_model(), CONFIGS["boft"](["0", "2"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for path in list_checkpoints(out):
        assert path.name.startswith("checkpoint-") and (path / "state.json").is_file(), path
        torch.load(path / "training_state.pt", weights_only=True)
    latest = resolve_checkpoint(out, "latest")
    if latest is not None:
        load_checkpoint(latest, model, optimizer, None)
    if (out / "adapter").exists():
        bv.load_adapter(fault_run_model(), out / "adapter")


def fault_run_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))


def soak(tmp_path, reference, kills: int, seed: int) -> None:
    rng, out = random.Random(seed), tmp_path / "run"
    done = 0
    while done < kills:
        before = len(list_checkpoints(out)) and int(list_checkpoints(out)[-1].name.split("-")[1])
        proc = start(out, "--step_seconds", "0.03")
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for progress, then kill somewhere
            found = list_checkpoints(out)
            if found and int(found[-1].name.split("-")[1]) > before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.12))
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
        assert_everything_loads(out)
    final = start(out, "--step_seconds", "0.03")
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-2000:]
    assert_everything_loads(out)
    ours = adapter(out)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key  # bit for bit
    assert done >= min(kills, 3)


@pytest.mark.slow  # ~40 s; `make test-all`
def test_kill_soak_resumes_to_the_uninterrupted_result(tmp_path, reference):
    soak(tmp_path, reference, kills=5, seed=0)


@pytest.mark.slow
def test_kill_soak_long(tmp_path, reference):
    soak(tmp_path, reference, kills=20, seed=1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_writes_a_checkpoint_and_resume_is_exact(tmp_path, reference, signum):
    out, started = tmp_path / "run", tmp_path / "started"
    proc = start(out, "--step_seconds", "0.1", "--checkpointing_steps", "1000", "--started_file", str(started))
    deadline = time.time() + 60
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.5)  # a few steps in
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "--resume_from_checkpoint latest" in err + _ and len(list_checkpoints(out)) == 1
    stopped_at = int(list_checkpoints(out)[0].name.split("-")[1])
    assert 0 < stopped_at < STEPS
    final = start(out, "--step_seconds", "0.1", "--checkpointing_steps", "1000", "--started_file", str(started))
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err[-2000:]
    ours = adapter(out)
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key


def test_divergence_stops_at_once_and_keeps_the_last_finite_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step \d+: the loss is (nan|inf)") as info:
        fault_run.main(["--output_dir", str(out), "--learning_rate", "1e25", "--max_train_steps", "40"])
    assert "lower --learning_rate" in str(info.value)
    assert not (out / "adapter").exists()  # nothing non-finite written
    latest = resolve_checkpoint(out, "latest")
    if latest is not None:
        state = torch.load(latest / "training_state.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_a_nan_step_is_skipped_under_deepspeed_as_under_ddp(tmp_path):
    """Process 0's loss is NaN at the third step of a two-process run without clipping: under DeepSpeed
    ZeRO-2 told not to measure the gradients' norm (so its engine, which steps inside the backward, would
    apply the NaN) both processes skip that step before the backward, as the DDP run skips it before the
    optimizer — the same finite adapter at the end."""
    import json

    from conftest import accelerate_launch

    (tmp_path / "zero2.json").write_text(json.dumps({
        "zero_optimization": {"stage": 2, "compute_grad_norm": False}, "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    (tmp_path / "zero2.yaml").write_text(f"distributed_type: DEEPSPEED\nnum_processes: 2\nuse_cpu: false\n"
                                         f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'zero2.json'}\n")
    runs = {}
    for engine in ("ddp", str(tmp_path / "zero2.yaml")):
        out = tmp_path / Path(engine).stem
        accelerate_launch(str(ROOT / "fault_run.py"), ["--output_dir", str(out), "--max_train_steps", "6",
                                                       "--nan_at_call", "3", "--max_nonfinite_steps", "1",
                                                       "--boft_dropout", "0", "--checkpointing_steps", "100",
                                                       "--max_grad_norm", "0"], engine)
        runs[Path(engine).stem] = adapter(out)
    for key, value in runs["ddp"].items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(runs["zero2"][key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_a_nan_loss_on_one_process_stops_every_process_of_an_epoch_loop(lm_run_inputs, tmp_path):
    """train_lm_boft.py (an epoch loop, like the VTAB and GLUE scripts) in two processes, process 0's loss NaN
    at step 3: both stop at step 3 with TrainingDiverged, process 1 naming the other process, before the step
    is applied — not process 1 dying in its next collective (gloo's "connection closed by peer" under
    torchrun; a wait until the timeout elsewhere), which it did when process 0 decided alone."""
    from conftest import accelerate_command, lm_script_args

    cmd, env = accelerate_command("train_lm_boft.py", lm_script_args(lm_run_inputs, tmp_path / "run"), nan_loss_at=3)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    diverged = r"\[rank{}\]: boftvision\.training\.checkpoints\.TrainingDiverged: step 3: {}"
    for rank, what in enumerate(["the loss is nan; stopping before it is applied", "another process's loss"]):
        assert re.search(diverged.format(rank, what), run.stderr), run.stderr[-3000:]
    assert "Connection closed" not in run.stderr


def test_save_adapter_refuses_non_finite_tensors(tmp_path, net):
    model = bv.add_adapter(net, CONFIGS["lora"](LINEAR))
    with torch.no_grad():
        model.fc1.adapters["default"].lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fc1\.lora_B\.weight has 1 non-finite"):
        bv.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    bv.save_adapter(model, tmp_path / "a", allow_nonfinite=True)


def test_latest_skips_incomplete_checkpoints_and_names_them(tmp_path):
    out = tmp_path / "run"
    fault_run.main(["--output_dir", str(out), "--max_train_steps", "3"])
    newest = out / "checkpoint-3"
    data = (newest / "training_state.pt").read_bytes()
    (newest / "training_state.pt").write_bytes(data[: len(data) // 2])  # what a kill -9 leaves
    (newest / "state.json").unlink()
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint-3"):
        assert resolve_checkpoint(out, "latest") == out / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(out, str(newest))
    with pytest.warns(UserWarning, match="checkpoint-3"):
        result = fault_run.main(["--output_dir", str(out), "--max_train_steps", "4", "--resume_from_checkpoint",
                                 "latest"])
    assert result["step"] == 4 and len(result["losses"]) == 4


def test_resume_with_other_settings_is_refused_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    fault_run.main(["--output_dir", str(out), "--max_train_steps", "2"])
    with pytest.raises(ValueError, match=r"--boft_block_size: 4 in the checkpoint, 8 now"):
        fault_run.main(["--output_dir", str(out), "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                        "--boft_block_size", "8"])
    with pytest.raises(ValueError, match=r"--adapter: 'boft' in the checkpoint, 'lora' now"):
        fault_run.main(["--output_dir", str(out), "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                        "--adapter", "lora"])
    result = fault_run.main(["--output_dir", str(out), "--max_train_steps", "3", "--resume_from_checkpoint",
                             "latest", "--learning_rate", "5e-3"])  # safe to change
    assert result["step"] == 3
    assert "--learning_rate changed: 0.01 → 0.005" in capsys.readouterr().out


def test_bad_images_are_listed_before_training(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "good.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.jpg").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match=r"2 image\(s\) cannot be read: cut.png .*noise.jpg.*--skip_bad_files"):
        list_images(tmp_path, "--instance_data_dir", check=True)
    with pytest.warns(UserWarning, match="skipping 2 unreadable"):
        assert [p.name for p in list_images(tmp_path, "--instance_data_dir", True, True)] == ["good.png"]


def test_an_unwritable_output_dir_is_found_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot be written"):
        claim_output_dir(blocker / "run")


def test_checkpoint_state_json_records_the_settings(tmp_path):
    out = tmp_path / "run"
    fault_run.main(["--output_dir", str(out), "--max_train_steps", "1"])
    settings = json.loads((out / "checkpoint-1" / "state.json").read_text())["settings"]
    assert settings["adapter"] == "boft" and settings["boft_block_size"] == 4 and "lora_r" not in settings


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_every_reader_lists_bad_files_before_training(tmp_path):
    """VTAB, ControlNet triplets, HQSeg pairs, JSONL/CSV rows: all bad files named at once, or skipped."""
    import numpy as np

    from boftvision.data.controlnet import read_metadata, write_triplets
    from boftvision.data.hqseg import HQSegDataset
    from boftvision.data.shapes import control_example
    from boftvision.data.text import read_rows
    from boftvision.data.vtab import VTABDataset

    task = tmp_path / "vtab" / "cifar"
    (task / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), "red").save(task / "images" / f"{i}.png")
    (task / "train800.txt").write_text("".join(f"images/{i}.png {i}\n" for i in range(3)))
    truncate(task / "images" / "1.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) cannot be read: 1.png"):
        VTABDataset(tmp_path / "vtab", "cifar", "train800")
    with pytest.warns(UserWarning, match="skipping 1"):
        assert len(VTABDataset(tmp_path / "vtab", "cifar", "train800", skip_bad=True)) == 2

    rng = np.random.default_rng(0)
    data = write_triplets(tmp_path / "control", [control_example(rng, 32) for _ in range(3)])
    truncate(data / "conditioning_images" / "00002.png")
    with pytest.raises(ValueError, match="00002.png"):
        read_metadata(data)
    with pytest.warns(UserWarning):
        assert len(read_metadata(data, skip_bad=True)) == 2

    sets = tmp_path / "hq" / "DIS5K" / "DIS-TR"
    (sets / "im").mkdir(parents=True), (sets / "gt").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (40, 40), "blue").save(sets / "im" / f"{i}.jpg")
        Image.new("L", (40, 40), 255).save(sets / "gt" / f"{i}.png")
    truncate(sets / "gt" / "0.png")
    with pytest.raises(ValueError, match="0.png"):
        HQSegDataset.from_sets(tmp_path / "hq", ["DIS5K-TR"])
    with pytest.warns(UserWarning):
        assert len(HQSegDataset.from_sets(tmp_path / "hq", ["DIS5K-TR"], skip_bad=True)) == 1

    (tmp_path / "rows.jsonl").write_text('{"sentence": "a", "label": 1}\n{broken\n{"sentence": "b"\n')
    with pytest.raises(ValueError, match=r"2 line\(s\) are not JSON: line 2 .*line 3"):
        read_rows(tmp_path / "rows.jsonl")
    (tmp_path / "header.csv").write_text("sentence,label\n")
    with pytest.raises(ValueError, match="has no rows"):
        read_rows(tmp_path / "header.csv")


def test_a_repeated_sigterm_is_caught_and_a_second_ctrl_c_is_not():
    """torchrun forwards to its workers the SIGTERM SLURM already sent to every process: the repeat must
    not kill a worker before its checkpoint. A second Ctrl-C still interrupts at once."""
    from boftvision.training.loop import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signal == signal.SIGTERM
    with StopSignals() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signal == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


def start_training(script, script_args):
    """Two processes under ``accelerate launch`` (conftest's command), output merged into one pipe."""
    from conftest import accelerate_command

    command, env = accelerate_command(script, script_args)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_and_wait_for_a_step(script, script_args):
    """:func:`start_training`, returned once the progress bar shows a finished step (the loop runs), with
    ``finish()``: waits for the launch to end and gives its whole output."""
    import threading

    proc, lines = start_training(script, script_args), []
    reader = threading.Thread(target=lambda: lines.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while "loss=" not in "".join(lines):
        assert time.time() < deadline and proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.1)

    def finish() -> str:
        proc.wait(timeout=120)
        reader.join(timeout=10)
        return "".join(lines)

    return proc, finish


@pytest.mark.slow  # ~30 s; `make test-all`
def test_sigterm_to_a_two_process_launch_checkpoints_every_process_at_one_step(tiny_sd, tmp_path):
    """`accelerate launch` with two (DDP) processes gets SIGTERM (what a pod or a job scheduler sends):
    its torchrun forwards it, both processes agree on the step to stop after, write one checkpoint
    together and exit; the same command plus --resume_from_checkpoint latest continues from that step."""
    from conftest import write_instance_images

    write_instance_images(tmp_path / "instance", 2)
    out = tmp_path / "run"

    def args(*extra):
        return ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(tmp_path / "instance"),
                "--instance_prompt", "a photo of sks shape", "--train_batch_size", "1", "--seed", "0",
                "--boft_block_size", "4", "--checkpointing_steps", "100000", "--output_dir", str(out), *extra]

    proc, finish = start_and_wait_for_a_step("train_dreambooth_boft.py", args("--max_train_steps", "100000"))
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    log = finish()
    assert proc.returncode != 0 and "SIGTERM: stopped after step" in log, log[-3000:]
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, log[-3000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at > 0 and not (out / "unet").exists()
    final = start_training("train_dreambooth_boft.py",
                           args("--max_train_steps", str(stopped_at + 2), "--resume_from_checkpoint", "latest"))
    log, _ = final.communicate(timeout=180)
    assert final.returncode == 0, log[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert f"resumed from {checkpoints[0]} at step {stopped_at}" in log
    assert result["steps"] == stopped_at + 2 and result["processes"] == 2 and len(result["losses"]) == stopped_at + 2


def test_a_signal_to_one_of_two_processes_stops_both_after_one_step(lm_run_inputs, tmp_path):
    """SIGTERM reaching one worker only (signals reach processes at different moments): the epoch loop's
    stop flag is gathered, so both processes stop after the same step and write its checkpoint together
    (process 0 writes — it never got the signal); the run then resumes from it to the end."""
    import psutil
    from conftest import lm_script_args

    out = tmp_path / "run"
    proc, finish = start_and_wait_for_a_step("train_lm_boft.py", lm_script_args(lm_run_inputs, out,
                                                                                 "--num_train_epochs", "400"))
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "train_lm_boft.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    log = finish()
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and "SIGTERM: stopped after step" in log, log[-3000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    total = 400 * 6  # 48 rows at 2 × 4 an epoch
    assert 0 < stopped_at < total
    final = start_training("train_lm_boft.py", lm_script_args(
        lm_run_inputs, out, "--num_train_epochs", "400", "--resume_from_checkpoint", "latest", "--max_train_steps",
        str(stopped_at + 3)))
    log, _ = final.communicate(timeout=180)
    assert final.returncode == 0, log[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == stopped_at + 3 and result["processes"] == 2
