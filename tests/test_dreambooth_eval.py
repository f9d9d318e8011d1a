"""DreamBooth evaluation: the pixel-measured shape scores on hand-made images, the similarity and
diversity functions on known inputs, and eval_dreambooth.py end to end — with tiny random DINO and CLIP
models built here, and with the pixel scores on the embedded pipeline and its bundled subject adapter."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boftvision.data.shapes import BACKGROUND, COLOURS, SHAPES, WORDS, render
from boftvision.integrations.diffusers import EMBEDDED_ADAPTER
from boftvision.integrations.diffusers.tiny import build_clip_tokenizer
from boftvision.metrics.dreambooth import (
    describe_shape,
    fraction_drawn,
    mean_std,
    prompt_similarity,
    subject_similarity,
    within_prompt_distance,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import eval_dreambooth  # noqa: E402

INSTANCE = ROOT / "boftvision" / "assets" / "sks-instance"


@pytest.mark.parametrize("size", [32, 64])
def test_describe_shape_names_every_hand_made_shape(size):
    rng = np.random.default_rng(size)
    wanted, described = [], []
    for kind in (*SHAPES, "ring"):
        for colour in COLOURS:
            for _ in range(8):
                wanted.append((colour, kind))
                described.append(describe_shape(render(kind, COLOURS[colour], size, rng), COLOURS, BACKGROUND))
    assert fraction_drawn(described, wanted) == 1.0
    blank = Image.new("RGB", (size, size), BACKGROUND)
    assert describe_shape(blank, COLOURS, BACKGROUND) == (None, None)
    purple = render("circle", (120, 30, 160), size, rng)  # a colour the world does not name
    assert describe_shape(purple, COLOURS, BACKGROUND) == (None, "circle")
    assert fraction_drawn([("red", "ring"), ("red", "circle")], [("red", "ring")] * 2) == 0.5
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        fraction_drawn([("red", "ring")] * 2, [("red", "ring")])


def test_similarities_and_diversity_on_known_inputs():
    torch.manual_seed(0)
    a = torch.randn(5, 16)
    assert subject_similarity(a[:1].repeat(3, 1), a[:1]) == pytest.approx(1.0, abs=1e-6)
    assert subject_similarity(a[:1], -a[:1]) == pytest.approx(-1.0, abs=1e-6)
    assert subject_similarity(a, a) == pytest.approx(float((a / a.norm(dim=1, keepdim=True) @ (
        a / a.norm(dim=1, keepdim=True)).T).mean()), abs=1e-6)
    assert prompt_similarity(a, 2 * a) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one text embedding per image"):
        prompt_similarity(a, a[:2])
    image = render("ring", COLOURS["red"], 32, np.random.default_rng(0))
    other = render("square", COLOURS["blue"], 32, np.random.default_rng(1))
    pixel_distance = lambda x, y: float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean())
    assert within_prompt_distance(pixel_distance, [[image, image, image]]) == 0.0
    assert within_prompt_distance(pixel_distance, [[image, other]]) > 10
    with pytest.raises(ValueError, match="at least two images"):
        within_prompt_distance(pixel_distance, [[image]])
    assert mean_std([0.0, 1.0]) == {"mean": 0.5, "std": 0.5, "n": 2}


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    """Tiny random DINO (ViT) and CLIP models with their processors, saved as users' folders."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    tokenizer = build_clip_tokenizer(WORDS, 16)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return root


def test_eval_scores_with_dino_and_clip(feature_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no AlexNet weights: LPIPS left out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks shape\na photo of sks shape on the left\n")
    common = ["--adapter_path", str(EMBEDDED_ADAPTER), "--instance_data_dir", str(INSTANCE),
              "--prompts_file", str(prompts), "--num_seeds", "2", "--num_inference_steps", "4",
              "--dino_model", str(feature_models / "dino"), "--clip_model", str(feature_models / "clip")]
    results = eval_dreambooth.main([*common, "--metrics", "dino,clip,lpips", "--compare_base",
                                    "--output_dir", str(tmp_path / "eval")])
    assert "LPIPS left out: LPIPS needs AlexNet's weights" in capsys.readouterr().out
    for name in ("adapter", "base"):
        assert set(results[name]) == {"DINO", "CLIP-I", "CLIP-T"}
        for score in results[name].values():
            assert len(score["per_seed"]) == 2 and all(-1 <= v <= 1 for v in score["per_seed"])
            assert score["mean"] == pytest.approx(np.mean(score["per_seed"]))
    assert results["adapter"]["DINO"]["per_seed"] != results["base"]["DINO"]["per_seed"]
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["results"]["adapter"]["CLIP-T"]["mean"] == pytest.approx(results["adapter"]["CLIP-T"]["mean"])
    assert written["settings"]["seeds"] == [0, 1]
    md = (tmp_path / "eval" / "results.md").read_text()
    assert md.splitlines()[0] == "| model | DINO | CLIP-I | CLIP-T |" and "| base |" in md

    # the real images scored as if generated: similarity of a set with itself is the mean pairwise cosine,
    # and a single image against itself is 1
    features = eval_dreambooth.Features(["dino", "clip"], str(feature_models / "dino"),
                                        str(feature_models / "clip"), "cpu")
    one = [Image.open(sorted(INSTANCE.glob("*.png"))[0]).convert("RGB")]
    assert subject_similarity(features.dino_images(one), features.dino_images(one)) == pytest.approx(1, abs=1e-5)
    assert subject_similarity(features.clip_images(one), features.clip_images(one)) == pytest.approx(1, abs=1e-5)

    with pytest.raises(ValueError, match="pass --instance_data_dir"):
        eval_dreambooth.main(["--adapter_path", str(EMBEDDED_ADAPTER), "--metrics", "dino"])
    with pytest.raises(SystemExit):
        eval_dreambooth.main(["--adapter_path", str(EMBEDDED_ADAPTER), "--metrics", "fid"])


def test_lpips_with_backbone_weights_present(tmp_path, monkeypatch):
    """With AlexNet's weights in torch's hub cache (random ones here: the check is the plumbing, not
    the perceptual calibration) LPIPS is built: 0 between identical images, > 0 between different ones."""
    from torchvision.models import AlexNet_Weights, alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(alexnet().state_dict(), cache / AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    distance, reason = eval_dreambooth.lpips_distance("cpu")
    assert reason is None
    image = render("ring", COLOURS["red"], 32, np.random.default_rng(0))
    other = render("square", COLOURS["blue"], 32, np.random.default_rng(1))
    assert distance(image, image) == pytest.approx(0.0, abs=1e-6)
    assert distance(image, other) > 1e-4


def test_shape_scores_of_the_bundled_subject_adapter(tmp_path):
    """On the embedded pipeline (metrics auto = shapes): the bundled DreamBooth adapter draws the subject
    where the base model never does, and the base model draws its colour × shape prompts (12 sampling
    steps instead of 25 for the suite's time: scores 0.75 / 0.0 / 0.92 there, 0.75 / 0.0 / 0.87 at 25)."""
    results = eval_dreambooth.main(["--adapter_path", str(EMBEDDED_ADAPTER), "--num_seeds", "4",
                                    "--guidance_scale", "4", "--num_inference_steps", "12", "--compare_base",
                                    "--output_dir", str(tmp_path)])
    adapter, base = results["adapter"], results["base"]
    assert base["subject fidelity"]["mean"] == 0.0
    assert adapter["subject fidelity"]["mean"] >= 0.5
    assert base["prompt preservation"]["mean"] >= 0.75
    assert 0 <= adapter["prompt preservation"]["mean"] <= 1
    assert len(adapter["drawn"]) == 13 and all(len(v) == 4 for v in adapter["drawn"].values())
