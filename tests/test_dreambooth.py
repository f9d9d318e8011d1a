"""DreamBooth on a tiny Stable Diffusion pipeline built here (random weights, the embedded model's
architecture): loss falls per adapter, checkpoints resume exactly, saved adapters reload into a fresh
pipeline, interpolation endpoints are exact, bad input is refused clearly, 2-process accelerate works."""
import json
import shutil
import statistics
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SD_ADAPTER_SIZES, accelerate_launch, write_instance_images

import boftvision as bv
from boftvision.adapters import METHODS
from boftvision.data.dreambooth import tokenize
from boftvision.data.shapes import CLASS_PROMPT, COLOURS, INSTANCE_PROMPT, SHAPES, WORDS, caption
from boftvision.generate import interpolation_path, set_identity_components
from boftvision.integrations.diffusers import (
    EMBEDDED,
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    attach_adapters,
    load_pipeline,
    pipeline_from_components,
    tiny_components,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import train_dreambooth_boft  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("dreambooth")
    (root / "model").symlink_to(tiny_sd, target_is_directory=True)
    write_instance_images(root / "instance", 3)
    return root


def args(root, out, *extra):
    return ["--pretrained_model_name_or_path", str(root / "model"), "--instance_data_dir", str(root / "instance"),
            "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out), "--learning_rate", "1e-2",
            "--train_batch_size", "3", "--seed", "0", *SD_ADAPTER_SIZES, *extra]


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), context).sample


@pytest.mark.parametrize("adapter", list(METHODS))
def test_dreambooth_loss_falls_and_adapter_reloads(setup, tmp_path, adapter):
    result = train_dreambooth_boft.main(args(setup, tmp_path, "--adapter", adapter, "--max_train_steps", "20",
                                             "--checkpointing_steps", "20"))
    losses = result["losses"]
    assert len(losses) == 20 and statistics.mean(losses[-5:]) < 0.95 * statistics.mean(losses[:5])
    assert (tmp_path / "checkpoint-20" / "training_state.pt").is_file()
    assert (tmp_path / "unet" / "adapter_model.safetensors").is_file()
    # the saved adapter in a fresh pipeline == the checkpoint's trained parameters in another one
    fresh = load_pipeline(setup / "model")
    attach_adapters(fresh, tmp_path)
    trained = load_pipeline(setup / "model")
    config = bv.config_from_dict(json.loads((tmp_path / "unet" / "adapter_config.json").read_text()))
    bv.add_adapter(trained.unet, config)
    state = torch.load(tmp_path / "checkpoint-20" / "training_state.pt", weights_only=False)["trainable"]
    params = dict(trained.unet.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name.removeprefix("unet.")].copy_(value)
    base = unet_output(load_pipeline(setup / "model").unet)
    out = unet_output(fresh.unet)
    torch.testing.assert_close(out, unet_output(trained.unet), atol=1e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-3  # training changed the model


def test_resume_from_latest_continues_exactly(setup, tmp_path):
    full = train_dreambooth_boft.main(args(setup, tmp_path / "full", "--max_train_steps", "12",
                                           "--checkpointing_steps", "4", "--train_text_encoder"))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoint-8", cut / "checkpoint-8")
    resumed = train_dreambooth_boft.main(args(setup, cut, "--max_train_steps", "12", "--checkpointing_steps", "4",
                                              "--train_text_encoder", "--resume_from_checkpoint", "latest"))
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)
    for part in ("unet", "text_encoder"):
        a = bv.io.read_adapter(tmp_path / "full" / part)[1]
        b = bv.io.read_adapter(cut / part)[1]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
        config = json.loads((cut / part / "adapter_config.json").read_text())
        assert config["peft_type"] == "BOFT"


def test_cache_latents_runs_the_vae_once_and_resumes_exactly(setup, tmp_path, monkeypatch):
    """--cache_latents: the VAE encodes each batch once before training (one batch per epoch here, 12
    steps), the loss falls, and a run resumed from step 8 equals the uninterrupted one."""
    from diffusers import AutoencoderKL

    encoded = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: encoded.append(1) or encode(self, *a, **k))
    full = train_dreambooth_boft.main(args(setup, tmp_path / "full", "--cache_latents", "--max_train_steps", "20",
                                           "--checkpointing_steps", "4"))
    assert len(encoded) == 1
    assert statistics.mean(full["losses"][-5:]) < 0.95 * statistics.mean(full["losses"][:5])
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoint-8", cut / "checkpoint-8")
    resumed = train_dreambooth_boft.main(args(setup, cut, "--cache_latents", "--max_train_steps", "20",
                                              "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"))
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)


def test_bf16_mixed_precision_keeps_adapters_fp32(setup, tmp_path):
    result = train_dreambooth_boft.main(args(setup, tmp_path, "--max_train_steps", "3", "--mixed_precision", "bf16",
                                             "--checkpointing_steps", "100", "--train_text_encoder"))
    assert result["steps"] == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    for part in ("unet", "text_encoder"):
        assert {t.dtype for t in bv.io.read_adapter(tmp_path / part)[1].values()} == {torch.float32}


def test_prior_preservation_generates_class_images_and_validates(setup, tmp_path):
    result = train_dreambooth_boft.main(args(
        setup, tmp_path / "out", "--max_train_steps", "2", "--with_prior_preservation", "--class_data_dir",
        str(tmp_path / "class"), "--class_prompt", "a photo of a shape", "--num_class_images", "3",
        "--num_inference_steps", "2", "--validation_prompt", INSTANCE_PROMPT, "--validation_steps", "1",
        "--num_validation_images", "2"))
    assert len(list((tmp_path / "class").glob("*.png"))) == 3
    assert result["steps"] == 2 and len(result["validation"]) == 2  # steps 1 and 2; the last is the final one
    assert len(set(result["validation"])) == 2
    assert all(Path(p).is_file() for p in result["validation"])


def test_interpolation_endpoints_are_exact(setup):
    pipe = load_pipeline(setup / "model")
    torch.manual_seed(0)
    config = bv.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=UNET_PRESETS["attention"],
                           init_weights=False)
    base = unet_output(pipe.unet)
    bv.add_adapter(pipe.unet, config)
    tuned = unet_output(pipe.unet)
    set_identity_components(pipe, 2, reset_scale=True)
    torch.testing.assert_close(unet_output(pipe.unet), base, atol=0, rtol=0)
    set_identity_components(pipe, 1)
    middle = unet_output(pipe.unet)
    set_identity_components(pipe, 0)
    torch.testing.assert_close(unet_output(pipe.unet), tuned, atol=0, rtol=0)
    assert (middle - tuned).abs().max() > 1e-4 and (middle - base).abs().max() > 1e-4
    path = interpolation_path(pipe, INSTANCE_PROMPT, seed=0, steps=2)
    assert [label for label, _ in path] == ["fine-tuned", "1/2 -> I", "2/2 -> I", "base"]


def test_bad_input(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        train_dreambooth_boft.main(args(setup, tmp_path / "o", "--instance_data_dir", str(tmp_path / "empty")))
    tokenizer = load_pipeline(setup / "model").tokenizer
    long_prompt = " ".join(["a photo of a red circle"] * 5)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenize(tokenizer, long_prompt)
    assert ids.shape == (tokenizer.model_max_length,)
    # an adapter made for another model: the error names the module and both shapes
    unet = load_pipeline(setup / "model").unet
    other = type(unet).from_config({**unet.config, "block_out_channels": (48, 96)})
    bv.add_adapter(other, bv.LoRAConfig(r=4, target_modules=UNET_PRESETS["attention"]))
    bv.save_adapter(other, tmp_path / "foreign" / "unet")
    with pytest.raises(ValueError, match=r"attn1\.to_.* has shape \(4, 48\) in the file but \(4, 32\) here"):
        attach_adapters(load_pipeline(setup / "model"), tmp_path / "foreign")
    with pytest.raises(FileNotFoundError, match="unet/adapter_config.json"):
        attach_adapters(load_pipeline(setup / "model"), tmp_path / "empty")
    assert TEXT_ENCODER_PRESETS["qv"] == ["q_proj", "v_proj"]


def test_embedded_tokenizer_holds_every_bundled_caption():
    """The embedded pipeline reads each caption it was trained on whole, end token included (none is
    cut to the text encoder's positions); its frozen text encoder is exactly the recipe's draw, and
    building the pipeline from the recipe's components warns about nothing."""
    pipe = load_pipeline(EMBEDDED)
    captions = [caption(c, s) for c in COLOURS for s in SHAPES] + [CLASS_PROMPT, INSTANCE_PROMPT,
                                                                            f"{INSTANCE_PROMPT} on the left"]
    limit = pipe.tokenizer.model_max_length
    assert pipe.text_encoder.config.max_position_embeddings == limit
    for text in captions:
        ids = pipe.tokenizer(text).input_ids
        assert len(ids) <= limit and ids[-1] == pipe.tokenizer.eos_token_id, (text, len(ids), limit)
    components = tiny_components(WORDS, seed=json.loads((EMBEDDED / "boftvision_training.json").read_text())["seed"])
    drawn = components["text_encoder"].state_dict()
    assert all(torch.equal(drawn[k], v) for k, v in pipe.text_encoder.state_dict().items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline_from_components(components)
    assert [str(w.message) for w in caught] == []


@pytest.mark.slow  # the default suite runs the script in two processes in test_sharding (DDP against FSDP)
def test_accelerate_launch_two_processes(setup, tmp_path):
    accelerate_launch("train_dreambooth_boft.py", args(
        setup, tmp_path, "--max_train_steps", "4", "--train_batch_size", "1", "--checkpointing_steps", "2"))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["processes"] == 2  # two processes really shared the run (not two lone ones)
    assert result["steps"] == 4 and result["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "unet" / "adapter_model.safetensors").is_file()


def test_export_merged_pipeline_equals_adapted_one(setup, tmp_path):
    from boftvision.integrations.diffusers import export_merged

    pipe = load_pipeline(setup / "model")
    torch.manual_seed(1)
    bv.add_adapter(pipe.unet, bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False,
                                            target_modules=UNET_PRESETS["attention"]))
    bv.add_adapter(pipe.text_encoder, bv.LoRAConfig(r=2, init_weights=False,
                                                    target_modules=TEXT_ENCODER_PRESETS["qv"]))
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        expected = unet_output(pipe.unet), pipe.text_encoder(ids)[0]
    export_merged(pipe, tmp_path / "merged")
    merged = load_pipeline(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(unet_output(merged.unet), expected[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged.text_encoder(ids)[0], expected[1], atol=1e-4, rtol=1e-4)
    assert not any("adapters" in name for name, _ in merged.unet.named_parameters())


def test_exports_for_comfyui_and_automatic1111(setup, tmp_path):
    """--orientation output --export_format lycoris --save_single_file: the LyCORIS file loads in
    lycoris-lora and the single file in diffusers' from_single_file, both giving the trained pipeline."""
    pytest.importorskip("lycoris.kohya", reason="lycoris-lora is a dev dependency")
    from conftest import apply_lycoris_file
    from diffusers import StableDiffusionPipeline

    train_dreambooth_boft.main(args(setup, tmp_path, "--adapter", "boft", "--orientation", "output",
                                    "--train_text_encoder", "--max_train_steps", "3", "--export_format", "lycoris",
                                    "--save_single_file"))
    ours = load_pipeline(setup / "model")
    assert attach_adapters(ours, tmp_path) == ["unet", "text_encoder"]
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        expected = unet_output(ours.unet), ours.text_encoder(ids)[0]
    assert (expected[0] - unet_output(load_pipeline(setup / "model").unet)).abs().max() > 1e-4

    theirs = load_pipeline(setup / "model")
    network = apply_lycoris_file(theirs, tmp_path / "adapter_lycoris.safetensors")
    assert len(network.unet_loras) > 0 and len(network.text_encoder_loras) > 0
    with torch.no_grad():
        torch.testing.assert_close(unet_output(theirs.unet), expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.text_encoder(ids)[0], expected[1], atol=1e-5, rtol=1e-5)

    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "model.safetensors"), config=str(setup / "model"),
                                                      safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        torch.testing.assert_close(unet_output(single.unet), expected[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(single.text_encoder(ids)[0], expected[1], atol=1e-4, rtol=1e-4)


def test_lycoris_export_of_input_side_boft_stops_before_training(setup, tmp_path):
    with pytest.raises(SystemExit, match="--orientation output"):
        train_dreambooth_boft.main(args(setup, tmp_path / "run", "--adapter", "boft", "--max_train_steps", "2",
                                        "--export_format", "lycoris"))
    assert not (tmp_path / "run" / "checkpoint-2").exists()

