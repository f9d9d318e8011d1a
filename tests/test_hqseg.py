"""SAM mask decoder on generated HQSeg-layout data: adapters raise mIoU over the frozen decoder, resume
reproduces an uninterrupted run, eval script == train-time validation, bad data gives clear errors."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import boftvision as bv
from boftvision.data.hqseg import HQSegDataset, find_pairs
from boftvision.integrations.sam import PRESETS, build_sam, sam_mask_decoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import eval_hqseg  # noqa: E402
import train_hqseg_boft  # noqa: E402

TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "out_chans": 32,
        "window_size": 0, "global_attn_indexes": [0], "decoder_depth": 2, "decoder_mlp_dim": 64, "decoder_heads": 2}


def shapes(folder: Path, mask_folder: Path, n: int, seed: int):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    mask_folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:48, 0:64]
    for i in range(n):
        cx, cy, rx, ry = rng.integers(16, 48), rng.integers(14, 34), rng.integers(6, 14), rng.integers(6, 12)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image = rng.normal(90, 20, (48, 64, 3))
        image[mask] = rng.normal(200, 20, 3)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"s{i}.jpg", quality=95)
        Image.fromarray((mask * 255).astype(np.uint8)).save(mask_folder / f"s{i}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hqseg")
    duts = root / "data/cascade_psp/DUTS-TR"
    shapes(duts, duts, 24, 0)
    shapes(root / "data/thin_object_detection/COIFT/images", root / "data/thin_object_detection/COIFT/masks", 8, 1)
    torch.manual_seed(0)
    torch.save(build_sam(TINY).state_dict(), root / "sam.pt")
    (root / "sam.json").write_text(json.dumps(TINY))
    return root


def common(root, out, *extra):
    return ["--data_root", str(root / "data"), "--train_sets", "DUTS-TR", "--eval_sets", "COIFT",
            "--sam_config", str(root / "sam.json"), "--checkpoint", str(root / "sam.pt"), "--output_dir", str(out),
            "--cache_dir", str(root / "cache"), "--learning_rate", "5e-3", "--boft_block_size", "4",
            "--oft_block_size", "8", "--vblora_vector_length", "4", "--vblora_num_vectors", "32", *extra]


@pytest.mark.parametrize("adapter,lr,epochs", [("boft", "1e-1", "8"), ("lora", "3e-2", "8"), ("vblora", "5e-2", "16")])
def test_adapters_raise_miou_and_eval_matches(setup, tmp_path, adapter, lr, epochs):
    result = train_hqseg_boft.main(common(setup, tmp_path, "--adapter", adapter, "--epochs", epochs,
                                          "--learning_rate", lr))
    assert result["after"]["COIFT"]["mIoU"] > result["before"]["COIFT"]["mIoU"] + 20
    scores = eval_hqseg.main(["--data_root", str(setup / "data"), "--eval_sets", "COIFT", "--sam_config",
                              str(setup / "sam.json"), "--checkpoint", str(setup / "sam.pt"), "--adapter_dir",
                              str(tmp_path / "adapter")])
    assert scores["COIFT"] == pytest.approx(result["after"]["COIFT"])
    assert "COIFT mIoU" in (tmp_path / "results.md").read_text()


def test_oft_trains(setup, tmp_path):
    """On this random-weight tiny SAM, OFT (a pure rotation: no output scale) lowers the loss but does
    not raise mIoU in 16–32 epochs at lr 1e-2…3e-1 or block sizes 8/16 (docs/hqseg.md)."""
    result = train_hqseg_boft.main(common(setup, tmp_path, "--adapter", "oft", "--epochs", "3",
                                          "--learning_rate", "3e-2"))
    assert result["epoch_losses"][-1] < result["epoch_losses"][0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_equals_uninterrupted_run(setup, tmp_path):
    full = train_hqseg_boft.main(common(setup, tmp_path / "full", "--epochs", "2", "--checkpoints_total_limit", "5"))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-12")  # 6 steps per epoch: keep only epoch 1
    resumed = train_hqseg_boft.main(common(setup, tmp_path / "cut", "--epochs", "2", "--resume_from_checkpoint",
                                           "latest"))
    assert resumed["epoch_losses"] == pytest.approx(full["epoch_losses"], abs=1e-6)
    assert resumed["after"]["COIFT"] == pytest.approx(full["after"]["COIFT"])


def test_bad_data(tmp_path):
    shapes(tmp_path / "im", tmp_path / "gt", 2, 0)
    (tmp_path / "gt" / "s1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) in .*im have no mask"):
        find_pairs(tmp_path / "im", tmp_path / "gt")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "gt" / "s1.png")
    with pytest.raises(ValueError, match="s1.png is empty"):
        HQSegDataset(find_pairs(tmp_path / "im", tmp_path / "gt"))[1]
    with pytest.raises(ValueError, match="unknown HQSeg set 'DIS'"):
        HQSegDataset.from_sets(tmp_path, ["DIS"])


def test_presets_cover_the_decoder():
    decoder = sam_mask_decoder()
    bv.add_adapter(decoder, bv.LoRAConfig(r=2, target_modules=PRESETS["decoder_all_linear"]))
    assert len(list(bv.inject.adapted_layers(decoder))) == 47  # every Linear of SAM's decoder
    decoder = sam_mask_decoder()
    bv.add_adapter(decoder, bv.LoRAConfig(r=2, target_modules=PRESETS["decoder_attention"]))
    assert len(list(bv.inject.adapted_layers(decoder))) == 28


def test_a_checkpoint_for_another_sam_is_one_clear_line(setup, tmp_path):
    with pytest.raises(ValueError, match="does not match --sam_config"):
        build_sam({**TINY, "embed_dim": TINY["embed_dim"] * 2}, str(setup / "sam.pt"))


def test_sigterm_mid_epoch_checkpoint_resumes_exactly(setup, tmp_path, monkeypatch):
    """A real SIGTERM at step 9 (epoch 2 of 6-step epochs): a checkpoint at that step, exit 143; the
    resumed run (same order and prompts) ends where the uninterrupted one does."""
    import os
    import signal

    full = train_hqseg_boft.main(common(setup, tmp_path / "full", "--epochs", "2"))
    real, calls = train_hqseg_boft.segmentation_loss, []

    def loss_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9 * 4:  # batch size 4: the last example of step 9
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_hqseg_boft, "segmentation_loss", loss_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train_hqseg_boft.main(common(setup, tmp_path / "cut", "--epochs", "2"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "cut" / "checkpoint-9" / "state.json").read_text())["partial"]["batches_done"] == 3
    monkeypatch.setattr(train_hqseg_boft, "segmentation_loss", real)
    resumed = train_hqseg_boft.main(common(setup, tmp_path / "cut", "--epochs", "2", "--resume_from_checkpoint",
                                           "latest"))
    assert resumed["epoch_losses"] == pytest.approx(full["epoch_losses"], abs=1e-6)
    assert resumed["after"]["COIFT"] == pytest.approx(full["after"]["COIFT"])


def test_embedding_cache_is_keyed_by_the_model(setup, tmp_path):
    from boftvision.integrations.sam import embedding_cache

    other = tmp_path / "other.pt"
    torch.save(build_sam(TINY).state_dict(), other)
    first = embedding_cache(tmp_path / "cache", "vit_b", str(setup / "sam.pt"), str(setup / "sam.json"))
    assert first == embedding_cache(tmp_path / "cache", "vit_b", str(setup / "sam.pt"), str(setup / "sam.json"))
    assert first != embedding_cache(tmp_path / "cache", "vit_b", str(other), str(setup / "sam.json"))
    assert first != embedding_cache(tmp_path / "cache", "vit_h", str(setup / "sam.pt"), str(setup / "sam.json"))
    assert first.parent == tmp_path / "cache" and embedding_cache(None, "vit_b", None) is None
