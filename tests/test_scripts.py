"""The entry-point scripts, end to end on tiny settings."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_core_demo_trains_every_method_and_reloads(tmp_path):
    out = run("demos/core_demo.py", "--max_train_steps", "25", "--output_dir", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"].split()[0] for r in rows] == ["LoRA", "VB-LoRA", "OFT", "BOFT", "BOFT"]
    for r in rows:
        assert r["loss_end"] < r["loss_start"]
        assert r["merge_error"] < 1e-4 and r["reload_error"] == 0.0
    assert (tmp_path / "boft" / "adapter_model.safetensors").is_file()
    assert "| BOFT m=2 b=8 |" in out


def test_layer_benchmark_prints_ratios():
    out = run("benchmarks/bench_layers.py", "--widths", "64", "--tokens", "64", "--layers", "2",
              "--iters", "1", "--warmup", "0", "--profile", "ours BOFT m=2 b=8")
    lines = [line for line in out.splitlines() if line.startswith("| 64 |")]
    labels = [line.split("|")[2].strip() for line in lines]
    assert "frozen base" in labels and "ours BOFT m=2 b=8" in labels and "PEFT BOFT m=2 b=8 true m" in labels
    assert all(float(line.split("|")[3]) > 0 for line in lines)  # step ms
    assert "ScaledLinearBackward" in out.split("ours BOFT m=2 b=8, width 64, 3 steps:")[1]  # the row's profile


@pytest.mark.slow  # a child process per row (~15 s); `make test-all`
def test_layer_benchmark_isolates_rows():
    isolated = run("benchmarks/bench_layers.py", "--widths", "64", "--tokens", "64", "--layers", "2", "--iters", "1",
                   "--warmup", "0", "--no-peft", "--isolate", "--rows", "ours LoRA")
    rows = [line.split("|")[2].strip() for line in isolated.splitlines() if line.startswith("| 64 |")]
    assert rows == ["frozen base", "ours LoRA r=16"]  # the row from its own process, no inference rows


def test_expressiveness_script_writes_table_and_plot(tmp_path):
    run("benchmarks/boft_expressiveness.py", "--dim", "32", "--seeds", "2", "--steps", "30", "--out", str(tmp_path))
    table = (tmp_path / "expressiveness.md").read_text()
    assert "| BOFT(9,2) |" in table or "| BOFT(5,2) |" in table
    assert (tmp_path / "expressiveness.png").stat().st_size > 1000


ENTRY_POINTS = [("train_dreambooth_boft", "parse_args"), ("train_controlnet_boft", "parse_args"),
                ("train_vtab_boft", "parse_args"), ("eval_vtab", "main"), ("train_glue_boft", "parse_args"),
                ("train_lm_boft", "parse_args"), ("train_hqseg_boft", "parse_args"), ("eval_hqseg", "main"),
                ("eval_control", "main"), ("train_tiny_sd", "parse_args"), ("control_demo", "main"),
                ("core_demo", "main"), ("minilm_glue_example", "parse_args"), ("boftvision.generate", "main")]


@pytest.mark.parametrize("module,function", ENTRY_POINTS)
def test_every_flag_has_help(monkeypatch, module, function):
    import argparse
    import importlib

    for folder in ("train_scripts", "demos"):
        monkeypatch.syspath_prepend(str(ROOT / folder))

    class Parsed(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    entry = getattr(importlib.import_module(module), function)
    with pytest.raises(Parsed) as parsed:
        entry() if module == "core_demo" else entry([])
    parser = parsed.value.args[0]
    silent = [a.option_strings or a.dest for a in parser._actions
              if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert silent == []


def test_model_benchmark_writes_lycoris_rows_to_json(tmp_path):
    out = tmp_path / "numbers.json"
    run("benchmarks/bench_models.py", "--models", "llama1b", "--tiny", "--device", "cpu", "--dtype", "fp32",
        "--iters", "1", "--warmup", "0", "--no-peft", "--lycoris", "--only", "BOFT full", "LyCORIS",
        "--json", str(out))
    rows = json.loads(out.read_text())["models"]["Llama 1B, seq 2048"]
    assert {"frozen base", "ours BOFT full b=8", "LyCORIS BOFT full b=8 (weight mode)",
            "LyCORIS BOFT full b=8 (bypass mode)"} <= set(rows)
    assert rows["frozen base"]["x_frozen"] == 1.0 and all(r["step_ms"] > 0 for r in rows.values())


def test_model_benchmark_runs_sdxl_with_its_added_conditions(tmp_path):
    """The SDXL row (text_time conditions: a UNet without them would fail in its first forward) with
    gradient checkpointing, on the tiny config."""
    out = tmp_path / "numbers.json"
    log = run("benchmarks/bench_models.py", "--models", "sdxl", "--tiny", "--device", "cpu", "--dtype", "fp32",
              "--iters", "1", "--warmup", "0", "--no-peft", "--gradient_checkpointing", "--only", "ours LoRA",
              "ours BOFT m=2", "--json", str(out))
    assert "gradient checkpointing=True" in log
    rows = json.loads(out.read_text())["models"]["SDXL UNet 1024², batch 1"]
    assert {"frozen base", "ours LoRA r=16", "ours BOFT m=2 b=8"} <= set(rows)
    assert all(r["step_ms"] > 0 for r in rows.values())


def test_ops_benchmark_times_every_piece():
    out = run("benchmarks/bench_ops.py", "--width", "128", "--tokens", "64", "--iters", "1")
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| piece")}
    assert len(rows) == 23 and all(ms > 0 for ms in rows.values())
    einsum = [label for label in rows if label.endswith("(einsum)")]  # each timed both ways
    assert len(einsum) == 6 and all(label.replace("(einsum)", "(as run)") in rows for label in einsum)


def test_dreambooth_comparison_trains_every_run_on_the_chosen_unet_layers(tmp_path, monkeypatch):
    """compare_dreambooth.py passes --unet_targets to every run (training itself is replaced here by a
    recorder writing the files a finished run leaves) and refuses a preset that does not exist."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_dreambooth

    trained = []

    def train(flags):
        trained.append(flags)
        out = Path(flags[flags.index("--output_dir") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"trainable_parameters": 1, "stored_parameters": 1,
                                                      "seconds": 1.0}))

    def score(flags):
        out = Path(flags[flags.index("--output_dir") + 1])
        out.mkdir(parents=True)
        scores = {"subject fidelity": {"mean": 0.5}, "prompt preservation": {"mean": 0.5}}
        (out / "results.json").write_text(json.dumps({"results": {"adapter": scores, "base": scores}}))

    monkeypatch.setattr(compare_dreambooth.train_dreambooth_boft, "main", train)
    monkeypatch.setattr(compare_dreambooth.eval_dreambooth, "main", score)
    compare_dreambooth.main(["--output_dir", str(tmp_path), "--unet_targets", "attention_ff", "--learning_rates",
                             "1e-3,2e-3", "--adapters", "BOFT m=2 b=8"])
    assert len(trained) == 3  # two rates with prior preservation, the best without
    assert all(f[f.index("--unet_targets") + 1] == "attention_ff" for f in trained)
    with pytest.raises(SystemExit):
        compare_dreambooth.main(["--output_dir", str(tmp_path), "--unet_targets", "attention_only"])


ACTIVATION_STEPS = """
import ctypes, resource, sys
from boftvision.training import keep_freed_memory
libc = ctypes.CDLL(None)  # the allocator torch's CPU tensors get their memory from
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory("cpu")
def step():  # what a training step does with its activations: 8 x 8 MiB written, then all freed
    blocks = [libc.malloc(8 << 20) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in reversed(blocks):
        libc.free(block)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_keep_freed_memory_stops_cpu_steps_faulting_their_activations_in_again():
    """glibc as it comes gives a step's freed 64 MiB back to the system and faults every page in again the
    next step (16 thousand 4 KiB pages); kept, the next step reuses them."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "BOFTVISION_"))}
    faults = {}
    for mode in ("as_is", "keep"):
        result = subprocess.run([sys.executable, "-c", ACTIVATION_STEPS, mode], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        faults[mode] = float(result.stdout.split()[-1])
    assert faults["as_is"] > 8000 and faults["keep"] < 100, faults


def test_training_accelerators_keep_freed_memory_on_cpu(monkeypatch, tmp_path):
    """Both Accelerator builders of the scripts turn it on for a CPU run (HQSeg, whose accelerator only
    tracks, for its --device)."""
    import argparse

    from boftvision.training import loop

    seen = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda device: seen.append(str(device)))
    args = argparse.Namespace(output_dir=str(tmp_path), report_to="none", gradient_accumulation_steps=1,
                              mixed_precision="no")
    loop.accelerator_from_args(args)
    loop.tracked_accelerator(args, "vtab")
    loop.tracked_accelerator(argparse.Namespace(**vars(args), device="cuda"), "hqseg", cpu=True)
    assert seen == ["cpu", "cpu", "cuda"]
