"""Command lines users already type: diffusers' DreamBooth-LoRA flags and PEFT's BOFT DreamBooth example
flags run unchanged on the tiny pipeline; flags that need something absent stop before training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from boftvision.data.shapes import INSTANCE_PROMPT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import train_dreambooth_boft  # noqa: E402


def base(tiny_sd, instance, out):
    return ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(instance),
            "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out)]


def test_a_diffusers_dreambooth_lora_command_runs_unchanged(tiny_sd, instance, tmp_path):
    """Flags of diffusers' examples/dreambooth/train_dreambooth_lora.py, with their values."""
    diffusers_flags = [
        "--rank", "4", "--num_train_epochs", "2", "--adam_weight_decay", "1e-2", "--adam_beta1", "0.9",
        "--adam_beta2", "0.999", "--adam_epsilon", "1e-08", "--allow_tf32", "--class_labels_conditioning",
        "timesteps", "--hub_model_id", "someone/sks", "--image_interpolation_mode", "lanczos", "--local_rank", "-1",
        "--logging_dir", "logs", "--lr_num_cycles", "1", "--lr_power", "1.0", "--lr_scheduler", "constant",
        "--pre_compute_text_embeddings", "--prior_generation_precision", "fp32", "--scale_lr",
        "--text_encoder_use_attention_mask", "--tokenizer_max_length", "16", "--tokenizer_name",
        str(tiny_sd / "tokenizer"), "--validation_epochs", "1", "--train_batch_size", "1", "--learning_rate",
        "1e-4", "--checkpointing_steps", "500", "--seed", "0", "--resolution", "32", "--mixed_precision", "no",
        "--gradient_accumulation_steps", "1", "--max_grad_norm", "1.0", "--report_to", "none",
        "--dataloader_num_workers", "0", "--adapter", "lora"]
    result = train_dreambooth_boft.main(base(tiny_sd, instance, tmp_path / "out") + diffusers_flags)
    assert result["steps"] == 4  # 2 epochs × 2 images, batch 1 (--num_train_epochs, as diffusers counts)
    config = json.loads((tmp_path / "out" / "unet" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_peft_boft_dreambooth_example_command_runs_unchanged(tiny_sd, instance, tmp_path):
    """Flags of PEFT's examples/boft_dreambooth/train_dreambooth.py."""
    peft_flags = [
        "--use_boft", "--boft_block_num", "8", "--boft_block_size", "0", "--boft_n_butterfly_factor", "1",
        "--boft_dropout", "0.1", "--boft_bias", "none", "--num_dataloader_workers", "0", "--set_grads_to_none",
        "--no_tracemalloc", "--report_to", "none", "--wandb_project_name", "dreambooth", "--wandb_run_name", "sks",
        "--max_train_steps", "2", "--learning_rate", "3e-5", "--train_text_encoder"]
    train_dreambooth_boft.main(base(tiny_sd, instance, tmp_path / "out") + peft_flags)
    config = json.loads((tmp_path / "out" / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_block_num"] == 8 and config["boft_block_size"] == 0


@pytest.mark.parametrize("flags,message", [
    (["--use_8bit_adam"], "needs bitsandbytes"),
    (["--enable_xformers_memory_efficient_attention"], "scaled-dot-product attention is already used"),
    (["--report_to", "wandb"], "needs wandb: pip install wandb"),
    (["--rank", "4", "--adapter", "boft"], "--rank sets the rank of LoRA"),
    (["--push_to_hub"], "needs a hub token"),
])
def test_flags_that_need_something_absent_stop_before_training(tiny_sd, instance, tmp_path, monkeypatch, capsys,
                                                               flags, message):
    import importlib.util

    import huggingface_hub

    real_find_spec, absent = importlib.util.find_spec, ("bitsandbytes", "xformers", "wandb")
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a machine without these packages
                        lambda name, *a: None if name in absent else real_find_spec(name, *a))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as stopped:
        train_dreambooth_boft.main(base(tiny_sd, instance, tmp_path / "out") + flags + ["--max_train_steps", "1"])
    assert message in str(stopped.value.code) + capsys.readouterr().err
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "unet").exists()


def test_push_to_hub_uploads_the_output_dir_after_training(tiny_sd, instance, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **k: calls.append(("create", repo)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.append(("upload", k["repo_id"],
                                                                                     k["folder_path"])))
    out = tmp_path / "out"
    result = train_dreambooth_boft.main(base(tiny_sd, instance, out) + [
        "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "someone/sks", "--hub_token", "hf_x"])
    assert calls == [("create", "someone/sks"), ("upload", "someone/sks", str(out))]
    assert result["hub_repo"] == "someone/sks"
    assert "hf_x" not in (out / "results.json").read_text()


def test_a_diffusers_controlnet_command_runs_unchanged(tiny_sd, tmp_path):
    """Flags of diffusers' examples/controlnet/train_controlnet.py that apply, with their values."""
    import numpy as np
    import train_controlnet_boft

    from boftvision.data.controlnet import write_triplets
    from boftvision.data.shapes import control_example

    rng = np.random.default_rng(0)
    data = write_triplets(tmp_path / "train", [control_example(rng, 32) for _ in range(4)])
    flags = ["--pretrained_model_name_or_path", str(tiny_sd), "--train_data_dir", str(data), "--output_dir",
             str(tmp_path / "out"), "--resolution", "32", "--learning_rate", "1e-5", "--train_batch_size", "2",
             "--num_train_epochs", "1", "--image_column", "image", "--conditioning_image_column",
             "conditioning_image", "--caption_column", "text", "--max_train_samples", "4",
             "--proportion_empty_prompts", "0.5", "--tracker_project_name", "controlnet", "--set_grads_to_none",
             "--dataloader_num_workers", "0", "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_weight_decay",
             "1e-2", "--adam_epsilon", "1e-08", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--lr_num_cycles", "1", "--lr_power", "1.0", "--checkpointing_steps", "500", "--seed", "0",
             "--mixed_precision", "no", "--allow_tf32", "--report_to", "none", "--logging_dir", "logs",
             "--validation_image", str(data / "conditioning_images" / "00000.png"), "--validation_prompt", "a shape",
             "--num_validation_images", "2", "--validation_steps", "100", "--boft_block_size", "4"]
    result = train_controlnet_boft.main(flags)
    assert result["steps"] == 2  # 4 samples, batch 2, 1 epoch
    assert (tmp_path / "out" / "unet" / "adapter_config.json").is_file()
    with pytest.raises(SystemExit):
        train_controlnet_boft.main(flags[:6] + ["--controlnet_model_name_or_path", "lllyasviel/sd-controlnet-canny"])


def test_newcomer_mistakes_get_a_clear_answer(tmp_path, capsys):
    """A bare checkpoint name is looked up in output_dir; `latest` on an empty folder says it starts
    fresh; flags of another method warn; a block size and a block number together are refused; HQSeg
    without SAM weights refuses to train a random SAM unless asked."""
    import argparse
    import warnings

    import train_hqseg_boft

    from boftvision.training import adapter_config_from_args, add_adapter_arguments, resolve_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "state.json").write_text("{}")
    import zipfile
    with zipfile.ZipFile(tmp_path / "checkpoint-2" / "training_state.pt", "w") as z:
        z.writestr("x", "y")
    assert resolve_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    assert "starting fresh" in capsys.readouterr().out

    parser = argparse.ArgumentParser()
    add_adapter_arguments(parser)
    args = parser.parse_args(["--adapter", "lora", "--boft_block_size", "4", "--oft_dropout", "0.3"])
    with pytest.warns(UserWarning, match="--adapter lora ignores --boft_block_size, --oft_dropout"):
        adapter_config_from_args(args, ["fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter_config_from_args(parser.parse_args(["--adapter", "boft"]), ["fc"])  # defaults: no warning
    with pytest.raises(ValueError, match="one of --boft_block_size .* and --boft_block_num"):
        adapter_config_from_args(parser.parse_args(["--boft_block_size", "4", "--boft_block_num", "8"]), ["fc"])
    assert adapter_config_from_args(parser.parse_args(["--boft_block_num", "8"]), ["fc"]).block_num == 8

    with pytest.raises(SystemExit):
        train_hqseg_boft.parse_args(["--data_root", str(tmp_path), "--model_type", "vit_b"])
    assert "pass --random_init" in capsys.readouterr().err


def test_paths_and_recorded_settings_spare_the_retyping(tmp_path, tiny_sd, monkeypatch):
    """A mistyped local path fails at once; generate takes the base model the adapter recorded (and warns
    when another is given); adapter arguments accept a run folder or its adapter folder."""
    import torch

    import boftvision as bv
    from boftvision import generate as generate_module
    from boftvision.files import check_model_location
    from boftvision.integrations.diffusers import UNET_PRESETS, adapter_parts, load_pipeline

    for typo in ("./models/sd-tiny", "/no/such/model", "outputs/run/model"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            check_model_location(typo)
    assert check_model_location("stable-diffusion-v1-5/stable-diffusion-v1-5")  # a hub id passes
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pipeline("./no-such-pipeline")

    pipe = load_pipeline(tiny_sd)
    bv.add_adapter(pipe.unet, bv.LoRAConfig(r=2, target_modules=UNET_PRESETS["attention"]))
    bv.save_adapter(pipe.unet, tmp_path / "run" / "unet")
    assert adapter_parts(tmp_path / "run" / "unet") == {"unet": tmp_path / "run" / "unet"}
    loaded = []

    class Stop(Exception):
        pass

    def fake_load(name, **kwargs):
        loaded.append(str(name))
        raise Stop

    monkeypatch.setattr(generate_module, "load_pipeline", fake_load)
    with pytest.raises(Stop):
        generate_module.main(["--adapter", str(tmp_path / "run"), "--prompt", "x"])
    assert loaded == [str(tiny_sd)]  # the recorded base, not the embedded default
    with pytest.warns(UserWarning, match="differs from the base"), pytest.raises(Stop):
        generate_module.main(["--adapter", str(tmp_path / "run"), "--prompt", "x", "--model",
                              str(tmp_path / "run")])

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["0"]))
    bv.save_adapter(model, tmp_path / "lm-run" / "adapter")
    bv.load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), tmp_path / "lm-run")  # the run folder works


def test_flags_that_do_nothing_say_so(tiny_sd, instance, tmp_path):
    with pytest.warns(UserWarning, match="ignored without --with_prior_preservation"):
        train_dreambooth_boft.parse_args(base(tiny_sd, instance, tmp_path / "out") + ["--class_prompt", "a shape"])


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    """From the command line, a mistake in the input prints `error: …` (exit 2); bugs keep tracebacks."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in ([str(ROOT / "train_scripts" / "train_dreambooth_boft.py"), "--instance_data_dir",
                     str(tmp_path / "no-such-folder"), "--instance_prompt", "a photo of sks shape", "--output_dir",
                     str(tmp_path / "out")],
                    ["-m", "boftvision.generate", "--adapter", str(tmp_path / "no-adapter"), "--prompt", "x"]):
        run = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "no-" in run.stderr


# One vocabulary: each concept has the diffusers/transformers spelling everywhere; older spellings still
# parse (with a FutureWarning) but only as aliases of that spelling.
VOCABULARY = {
    "--pretrained_model_name_or_path": {"--model", "--model_name_or_path", "--base_model"},
    "--adapter_path": {"--adapter_dir", "--run_dir", "--adapter_folder"},
    "--num_inference_steps": {"--steps", "--inference_steps"},
    "--train_batch_size": {"--batch_size"},
    "--eval_batch_size": {"--batch_size"},
    "--num_train_epochs": {"--epochs"},
    "--dataloader_num_workers": {"--num_workers", "--num_dataloader_workers"},
    "--max_train_steps": {"--train_steps", "--steps"},
    "--output_dir": {"--out_dir", "--output_folder", "--out"},  # --out stays where it names one file
    "--learning_rate": {"--lr"},
}
# both are what users of one library type, for the same thing: accepted side by side, no warning
SYNONYMS = {("--weight_decay", "--adam_weight_decay")}  # transformers' and diffusers' names
ENTRY_POINTS = ["boftvision/generate.py",
                *sorted(f"train_scripts/{p.name}" for p in (ROOT / "train_scripts").glob("*.py")),
                *sorted(f"demos/{p.name}" for p in (ROOT / "demos").glob("*.py"))]


def entry_point_parsers(monkeypatch) -> dict:
    """Every entry point's ArgumentParser, caught as it starts parsing."""
    import argparse
    import importlib
    import importlib.util
    import inspect

    class Caught(Exception):
        pass

    parsers = {}

    def catch(self, args=None, namespace=None):
        parsers[current] = self
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(sys, "argv", ["prog"])
    for current in ENTRY_POINTS:
        if current.startswith("boftvision/"):  # a package module: python -m boftvision.generate
            module = importlib.import_module(current[:-3].replace("/", "."))
        else:
            spec = importlib.util.spec_from_file_location(Path(current).stem + "_cli", ROOT / current)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        entry = getattr(module, "parse_args", None) or module.main
        try:
            entry([]) if inspect.signature(entry).parameters else entry()
        except Caught:
            pass
    return parsers


def test_one_vocabulary_across_entry_points(monkeypatch):
    from boftvision.adapters import METHODS
    from boftvision.training import RENAMED, RENAMED_APPEND

    parsers = entry_point_parsers(monkeypatch)
    assert set(parsers) == set(ENTRY_POINTS)
    old = {}  # old spelling → the flags it may stand for
    for new, spellings in VOCABULARY.items():
        for spelling in spellings:
            old.setdefault(spelling, set()).add(new)
    problems = []
    for script, parser in parsers.items():
        for action in parser._actions:
            first, *others = [o for o in action.option_strings if o != "-h"] or [""]
            if first in old and not (first == "--out" and "file" in (action.help or "")):
                problems.append(f"{script}: {first} (say {' or '.join(sorted(old[first]))})")
            for spelling in others:
                if spelling == f"--no-{first[2:]}" or (first, spelling) in SYNONYMS:  # a boolean's negative form
                    continue
                meant = {"--adapter_path"} if spelling == "--adapter" else old.get(spelling, set())  # --adapter DIR
                if first not in meant or not isinstance(action, (RENAMED, RENAMED_APPEND)):
                    problems.append(f"{script}: {spelling} is not a deprecated alias of its concept's flag")
            if first == "--adapter" and not set(action.choices or []) >= set(METHODS):
                problems.append(f"{script}: --adapter names a method; a folder to load is --adapter_path")
    assert not problems, problems


def test_old_spellings_still_work_with_a_warning():
    from boftvision import generate

    with pytest.warns(FutureWarning, match="--steps is deprecated; use --num_inference_steps"):
        with pytest.raises(SystemExit):  # parsed, then refused for the missing --prompt
            generate.main(["--steps", "3"])
