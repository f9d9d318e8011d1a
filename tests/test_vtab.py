"""DINOv2 on a generated VTAB-layout folder: training beats chance, resume equals an uninterrupted run,
the eval script reproduces the training script's accuracy, bad folders give clear errors."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import boftvision as bv
from boftvision.adapters import METHODS
from boftvision.data.vtab import VTABDataset
from boftvision.integrations.dinov2 import Dinov2Classifier, add_classifier_adapter, dinov2_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import eval_vtab  # noqa: E402
import train_vtab_boft  # noqa: E402

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]  # class = dominant colour


def make_task(root: Path, task: str, counts=(("train800", 24), ("val200", 6), ("train800val200", 30),
                                             ("test", 15)), seed=0):
    rng = np.random.default_rng(seed)
    folder = root / task / "images"
    folder.mkdir(parents=True)
    for split, n in counts:
        lines = []
        for i in range(n):
            label = i % len(COLOURS)
            pixels = np.clip(rng.normal(COLOURS[label], 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"images/{split}_{i}.png"
            Image.fromarray(pixels).save(root / task / name)
            lines.append(f"{name} {label}")
        (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("vtab")
    from transformers import Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(dinov2_config("small", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              mlp_ratio=2, image_size=28)).save_pretrained(base / "model")
    for task in ("eurosat", "dtd"):
        make_task(base / "data", task)
    return base


def common(tiny, out, *extra):
    return ["--model_name_or_path", str(tiny / "model"), "--data_root", str(tiny / "data"),
            "--output_dir", str(out), "--image_size", "28", "--train_batch_size", "8", "--num_workers", "0",
            "--learning_rate", "0.01", "--boft_block_size", "4", "--boft_n_butterfly_factor", "2",
            "--vblora_vector_length", "16", "--vblora_num_vectors", "16", "--lora_r", "4", *extra]


@pytest.mark.parametrize("adapter", list(METHODS))
def test_training_beats_chance_and_eval_matches(tiny, tmp_path, adapter):
    out = tmp_path / adapter
    train_vtab_boft.main(common(tiny, out, "--adapter", adapter, "--tasks", "eurosat", "--epochs", "8",
                                "--oft_block_size", "8"))
    result = json.loads((out / "eurosat" / "seed0" / "result.json").read_text())
    assert result["top1"] >= 70.0  # 3 balanced classes: chance is 33 %
    assert result["epoch_losses"][-1] < result["epoch_losses"][0]
    accuracy = eval_vtab.main(["--model_name_or_path", str(tiny / "model"),
                               "--run_dir", str(out / "eurosat" / "seed0"),
                               "--data_root", str(tiny / "data"), "--image_size", "28"])
    assert accuracy == result["top1"]
    header, _, row = (out / "results.md").read_text().splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["eurosat"] == f"{result['top1']:.1f}" and cells["Specialized"] == cells["eurosat"]


def test_resume_equals_uninterrupted_run(tiny, tmp_path):
    args = ["--tasks", "dtd", "--epochs", "4", "--checkpoints_total_limit", "10"]
    train_vtab_boft.main(common(tiny, tmp_path / "full", *args))
    full = json.loads((tmp_path / "full" / "dtd" / "seed0" / "result.json").read_text())
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    run_dir = tmp_path / "cut" / "dtd" / "seed0"
    for later in ("checkpoint-8", "checkpoint-12", "checkpoint-16", "result.json"):  # 4 steps per epoch
        target = run_dir / later
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    train_vtab_boft.main(common(tiny, tmp_path / "cut", *args, "--resume_from_checkpoint", "latest"))
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["epoch_losses"] == pytest.approx(full["epoch_losses"], abs=1e-6)
    assert resumed["top1"] == full["top1"]


def test_sigterm_stops_and_resume_equals_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """A real SIGTERM in the middle of epoch 3: the run finishes the step, writes a mid-epoch checkpoint,
    exits with 143; resuming from it ends where the uninterrupted run does."""
    import os
    import signal

    args = ["--tasks", "dtd", "--epochs", "3"]
    train_vtab_boft.main(common(tiny, tmp_path / "full", *args))
    full = json.loads((tmp_path / "full" / "dtd" / "seed0" / "result.json").read_text())
    real_loss, calls = torch.nn.functional.cross_entropy, []

    def loss_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 10:  # step 10 of 12: inside epoch 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train_vtab_boft.main(common(tiny, tmp_path / "cut", *args))
    assert stopped.value.code == 128 + signal.SIGTERM
    state = json.loads((tmp_path / "cut" / "dtd" / "seed0" / "checkpoint-10" / "state.json").read_text())
    assert state["epoch"] == 2 and state["partial"]["batches_done"] == 2  # written mid-epoch, at the step
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_loss)
    train_vtab_boft.main(common(tiny, tmp_path / "cut", *args, "--resume_from_checkpoint", "latest"))
    resumed = json.loads((tmp_path / "cut" / "dtd" / "seed0" / "result.json").read_text())
    assert resumed["epoch_losses"] == pytest.approx(full["epoch_losses"], abs=1e-6)
    assert resumed["top1"] == full["top1"]


def test_two_tasks_give_the_paper_table(tiny, tmp_path):
    train_vtab_boft.main(common(tiny, tmp_path, "--tasks", "eurosat", "dtd", "--epochs", "1", "--seeds", "0", "1"))
    header, _, row = (tmp_path / "results.md").read_text().splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert "±" in cells["eurosat"] and "±" in cells["dtd"] and cells["cifar"] == "–"
    assert cells["Natural"] != "–" and cells["Structured"] == "–"
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4


def test_bad_folders(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="task folder .*cifar not found"):
        VTABDataset(tiny / "data", "cifar", "test")
    make_task(tmp_path, "eurosat")
    (tmp_path / "eurosat" / "images" / "test_0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"test.txt:1 names images/test_0.png"):
        VTABDataset(tmp_path, "eurosat", "test")
    (tmp_path / "eurosat" / "val200.txt").write_text("images/val200_0.png 10\n")
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\) for eurosat"):
        VTABDataset(tmp_path, "eurosat", "val200")


def test_head_is_trained_but_not_counted():
    from transformers import Dinov2Model

    backbone = Dinov2Model(dinov2_config("small", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         mlp_ratio=2))
    model = add_classifier_adapter(Dinov2Classifier(backbone, 5), bv.BOFTConfig(block_size=4, n_butterfly_factor=2))
    assert model.head.weight.requires_grad
    assert bv.count_parameters(model).trainable == bv.count_parameters(model.backbone).trainable + 32 * 5 + 5
    names = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert names and all(".adapters.default." in n for n in names)


# --- DINOv2 through timm, loaded as users load it offline (pretrained=False + a local checkpoint) -------
TIMM_NAME = "vit_small_patch14_dinov2"
TIMM_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 1.0}  # LayerScale 1 as transformers


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=28, **TIMM_TINY)
    path = tmp_path_factory.mktemp("timm") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("adapter", list(METHODS))
def test_timm_dinov2_trains_with_every_adapter_and_round_trips_through_peft(tiny, timm_checkpoint, tmp_path,
                                                                            adapter):
    from peft_reference import peft_from_pretrained

    from boftvision.integrations.dinov2 import load_backbone

    out = tmp_path / adapter
    timm_args = ["--backbone_source", "timm", "--model_name_or_path", TIMM_NAME, "--timm_checkpoint",
                 str(timm_checkpoint), "--timm_kwargs", json.dumps(TIMM_TINY)]
    train_vtab_boft.main(common(tiny, out, "--adapter", adapter, "--tasks", "eurosat", "--epochs", "8",
                                "--oft_block_size", "8", *timm_args)[2:])  # common()'s model is transformers'
    result = json.loads((out / "eurosat" / "seed0" / "result.json").read_text())
    assert result["top1"] >= 70.0 and result["epoch_losses"][-1] < result["epoch_losses"][0]
    accuracy = eval_vtab.main(["--run_dir", str(out / "eurosat" / "seed0"), "--data_root", str(tiny / "data")])
    # backbone (timm name, checkpoint, overrides), classes and image size come from what the run recorded
    assert accuracy == result["top1"]
    base = load_backbone(TIMM_NAME, "timm", str(timm_checkpoint), 28, TIMM_TINY).eval()
    ours = bv.load_adapter(load_backbone(TIMM_NAME, "timm", str(timm_checkpoint), 28, TIMM_TINY).eval(),
                           out / "eurosat" / "seed0" / "adapter")
    theirs = peft_from_pretrained(base, out / "eurosat" / "seed0" / "adapter").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_timm_and_transformers_mlp_adapters_count_the_same(timm_checkpoint):
    """The MLP layers have the same shapes in both builds, so the same counts; attention differs by
    design: timm fuses q, k, v into one Linear (one input rotation / one LoRA pair instead of three)."""
    from transformers import Dinov2Model

    from boftvision.integrations.dinov2 import MLP_TARGETS, load_backbone

    timm_model = load_backbone(TIMM_NAME, "timm", str(timm_checkpoint), 28, TIMM_TINY)
    hf_model = Dinov2Model(dinov2_config("small", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=28))
    for config in (bv.LoRAConfig(r=4, target_modules=MLP_TARGETS), bv.BOFTConfig(block_size=4, n_butterfly_factor=2,
                                                                                 target_modules=MLP_TARGETS)):
        counts = [bv.count_parameters(bv.add_adapter(m, config, name=config.method)) for m in (timm_model, hf_model)]
        assert counts[0].stored == counts[1].stored > 0


def test_a_custom_task_gets_its_own_column():
    table = train_vtab_boft.markdown_table([{"task": "my_task", "top1": 81.25}], 1000)
    header, _, row = table.splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["my_task"] == "81.2" and cells["mean"] == "81.2"


def test_initial_values_do_not_depend_on_how_the_backbone_loaded(tiny, tmp_path, monkeypatch):
    """The head, a LoRA adapter (random A) and the data order come from the seed alone: a backbone load that
    draws other random numbers (transformers under DeepSpeed ZeRO-3 draws none) gives the same run."""
    def run(out):
        train_vtab_boft.main(common(tiny, out, "--adapter", "lora", "--tasks", "dtd", "--epochs", "1"))
        return json.loads((out / "dtd" / "seed0" / "result.json").read_text())

    plain = run(tmp_path / "plain")
    load = train_vtab_boft.load_backbone
    monkeypatch.setattr(train_vtab_boft, "load_backbone", lambda *a: (torch.rand(7), load(*a))[1])
    drawn = run(tmp_path / "drawn")
    assert drawn["epoch_losses"] == plain["epoch_losses"]
    for name in ("head.safetensors", "adapter/adapter_model.safetensors"):
        theirs = load_file(tmp_path / "plain" / "dtd" / "seed0" / name)
        ours = load_file(tmp_path / "drawn" / "dtd" / "seed0" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
