"""Files from elsewhere are data, never code or a way to exhaust the machine; runs never mix or
overwrite each other; what we write appears whole. Each test is one point of docs/security.md."""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, LINEAR, TinyNet
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import boftvision as bv
from boftvision import io as adapter_io
from boftvision.data.controlnet import read_metadata, write_triplets
from boftvision.data.dreambooth import list_images
from boftvision.data.vtab import VTABDataset
from boftvision.training import claim_output_dir, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# --- checkpoints ------------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def trained_tiny(net):
    model = bv.add_adapter(net, CONFIGS["boft"](LINEAR))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.randn(2, 32), torch.randn(1, 8, 6, 6))[0].sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, net):
    model, optimizer, scheduler = trained_tiny(net)
    folder = save_checkpoint(tmp_path, model, optimizer, scheduler, step=1)
    state = torch.load(folder / "training_state.pt", weights_only=True)
    marker = tmp_path / "payload-ran"
    state["rng"]["python"] = Payload(marker)
    torch.save(state, folder / "training_state.pt")
    with pytest.raises(ValueError, match="could run code"):
        load_checkpoint(folder, model, optimizer, scheduler)
    assert not marker.exists()


def test_checkpoints_hold_plain_data_and_restore_every_rng(tmp_path, net):
    import random

    model, optimizer, scheduler = trained_tiny(net)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    folder = save_checkpoint(tmp_path, model, optimizer, scheduler, step=7, extra={"losses": [1.0]})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.load(folder / "training_state.pt", weights_only=True)  # plain data only
    assert load_checkpoint(folder, model, optimizer, scheduler)["step"] == 7
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]  # no temporary folder left


def test_a_failed_checkpoint_write_leaves_nothing(tmp_path, net, monkeypatch):
    model, optimizer, scheduler = trained_tiny(net)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, optimizer, scheduler, step=3)
    assert list(tmp_path.iterdir()) == []


# --- adapter configs and files ----------------------------------------------------------------------
def write_adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def saved(tmp_path, net, method="boft"):
    model = bv.add_adapter(net, CONFIGS[method](LINEAR, init=False))
    bv.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    return config, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("pattern", [r"([\w.]+)+!", r"(a|ab)*!", r"(.*x){30}!", "x" * 5000])
def test_catastrophic_regex_is_refused_at_once(tmp_path, net, pattern):
    config, tensors = saved(tmp_path, net)
    config["target_modules"] = pattern
    folder = write_adapter(tmp_path / "evil", config, tensors)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="target_modules"):
        bv.load_adapter(TinyNet(), folder)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("field,value", [("r", 20_000_000), ("boft_n_butterfly_factor", 2**40),
                                         ("num_cayley_neumann_terms", 10**9), ("num_vectors", 2**30)])
def test_sizes_are_bounded_before_anything_is_allocated(field, value):
    peft_type = {"r": "LORA", "boft_n_butterfly_factor": "BOFT", "num_cayley_neumann_terms": "OFT",
                 "num_vectors": "VBLORA"}[field]
    data = {"peft_type": peft_type, "target_modules": ["fc1"], field: value}
    if peft_type == "BOFT":
        data["boft_block_size"] = 4
    if peft_type == "OFT":
        data["oft_block_size"] = 8
    start = time.perf_counter()
    with pytest.raises(ValueError, match=field.removeprefix("boft_")):
        bv.config_from_dict(data)
    assert time.perf_counter() - start < 1.0


def test_a_config_larger_than_its_tensors_is_refused_before_allocation(tmp_path, net, monkeypatch):
    config, tensors = saved(tmp_path, net, "lora")
    config["r"] = 60_000  # within the limit, but not what the file holds
    folder = write_adapter(tmp_path / "big", config, tensors)
    monkeypatch.setattr(adapter_io.peft, "add_adapter", lambda *a, **k: pytest.fail("allocated before checking"))
    with pytest.raises(ValueError, match=r"has shape \(4, 32\) in the file but \(60000, 32\)"):
        bv.load_adapter(TinyNet(), folder)


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t.index_fill_(0, torch.tensor([0]), float("nan")), "non-finite"),
    (lambda t: t.fill_(float("inf")), "non-finite"),
    (lambda t: t.long(), "int64, not floating point"),
    (lambda t: t.bool(), "bool, not floating point"),
])
def test_non_finite_or_non_float_tensors_are_refused_by_name(tmp_path, net, corrupt, match):
    config, tensors = saved(tmp_path, net)
    key = next(k for k in sorted(tensors) if "boft_R" in k)
    tensors[key] = corrupt(tensors[key].clone())
    folder = write_adapter(tmp_path / "bad", config, tensors)
    target = TinyNet()
    with pytest.raises(ValueError, match=f"{key}.*{match}"):
        bv.load_adapter(target, folder)
    assert not any(isinstance(m, bv.adapters.AdaptedLayer) for m in target.modules())


def test_adapter_weights_and_config_are_written_together(tmp_path, net, monkeypatch):
    """A failure while saving leaves the previous adapter whole; a user's other files are kept."""
    model = bv.add_adapter(net, CONFIGS["lora"](LINEAR, init=False))
    folder = bv.save_adapter(model, tmp_path / "adapter")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    model.boftvision_configs["default"].alpha = 64.0

    def broken(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(adapter_io.peft, "save_file", broken)
    with pytest.raises(OSError):
        bv.save_adapter(model, folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    (folder / "notes.txt").write_text("mine")
    bv.save_adapter(model, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 64.0


# --- output folders -----------------------------------------------------------------------------
def test_an_output_dir_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "text_encoder").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "class").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        claim_output_dir(out)
    with pytest.raises(FileExistsError):  # "latest" with nothing to resume is not a resume
        claim_output_dir(out, resume="latest")
    (out / "checkpoint-5").mkdir()
    claim_output_dir(out, resume="latest")  # continuing that run
    claim_output_dir(out, overwrite=True, keep=(out / "class",))
    assert sorted(p.name for p in out.iterdir()) == ["class"]  # inputs kept, the old run gone
    claim_output_dir(out, keep=(out / "class",))


def test_dreambooth_refuses_to_mix_with_an_earlier_run(tmp_path, tiny_sd):
    sys.path.insert(0, str(ROOT / "train_scripts"))
    import train_dreambooth_boft
    from conftest import write_instance_images

    from boftvision.data.shapes import INSTANCE_PROMPT

    write_instance_images(tmp_path / "instance")
    out = tmp_path / "out"
    common = ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(tmp_path / "instance"),
              "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out), "--max_train_steps", "1",
              "--boft_block_size", "4", "--oft_block_size", "8"]
    train_dreambooth_boft.main(common + ["--train_text_encoder", "--checkpointing_steps", "1"])
    assert (out / "text_encoder").is_dir()
    with pytest.raises(FileExistsError, match="holds another run"):
        train_dreambooth_boft.main(common + ["--adapter", "lora"])
    result = train_dreambooth_boft.main(common + ["--adapter", "lora", "--overwrite_output_dir"])
    assert not (out / "text_encoder").exists() and result["checkpoints"] == []
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_defaults_never_point_into_the_package_or_at_tracked_files():
    sys.path.insert(0, str(ROOT / "train_scripts"))
    sys.path.insert(0, str(ROOT / "demos"))
    import minilm_glue_example
    import train_tiny_sd

    assert not Path(train_tiny_sd.parse_args([]).output_dir).resolve().is_relative_to(ROOT / "boftvision")
    assert minilm_glue_example.parse_args([]).docs is None


# --- data readers -------------------------------------------------------------------------------
def test_dreambooth_folder_takes_regular_files_only(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")  # would block the loader for ever
    (tmp_path / "c.png").mkdir()
    with pytest.warns(UserWarning, match=r"skipping \['b.png', 'c.png'\]"):
        images = list_images(tmp_path, "--instance_data_dir")
    assert [p.name for p in images] == ["a.png"]


def test_listed_paths_must_stay_inside_the_dataset(tmp_path):
    task = tmp_path / "vtab" / "cifar"
    (task / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(task / "images" / "0.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (task / "train800.txt").write_text("images/0.png 1\n../../secret.png 2\n")
    with pytest.raises(ValueError, match="outside the dataset folder"):
        VTABDataset(tmp_path / "vtab", "cifar", "train800")
    assert len(VTABDataset(tmp_path / "vtab", "cifar", "train800", allow_outside=True)) == 2
    (task / "train800.txt").write_text("images/0.png 1\n")
    os.mkfifo(task / "images" / "fifo.png")
    (task / "train800.txt").write_text("images/fifo.png 1\n")
    with pytest.raises(ValueError, match="not a regular file"):
        VTABDataset(tmp_path / "vtab", "cifar", "train800")

    data = write_triplets(tmp_path / "control", [(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), "x")])
    line = json.loads((data / "metadata.jsonl").read_text())
    line["conditioning_image"] = str(secret)
    (data / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="outside the dataset folder"):
        read_metadata(data)
    assert read_metadata(data, allow_outside=True)[0]["control"] == secret.resolve()


def test_warnings_module_is_quiet_for_plain_folders(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_images(tmp_path, "--instance_data_dir")) == 1


def test_modules_to_save_in_a_file_never_replace_base_weights(tmp_path):
    """An adapter file naming a base module in modules_to_save (conv_in-style) fills a copy only."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = nn.Conv2d(4, 8, 3)
            self.fc = nn.Linear(8, 8)

    torch.manual_seed(0)
    model = Net()
    bv.add_adapter(model, bv.LoRAConfig(r=2, target_modules=["fc"], modules_to_save=["conv_in"]))
    bv.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.conv_in.weight"] = torch.full_like(tensors["base_model.model.conv_in.weight"], 9.0)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    victim = Net()
    original = victim.conv_in.weight.detach().clone()
    bv.load_adapter(victim, tmp_path)
    bv.remove_adapter(victim)
    torch.testing.assert_close(victim.conv_in.weight, original, atol=0, rtol=0)
