"""Controllable generation on the embedded tiny pipeline: the control is a shape-position map (a white
disk where the object must be). Generates the triplets, trains the control encoder + BOFT on the UNet
(train_controlnet_boft.py), scores the control error against the base model (eval_control.py), and
writes the interpolation grid: control image, then the fine-tuned model, components set to identity
one by one, and the base model — the object moves from where the control says to where the base
model puts it.

    python demos/control_demo.py --output_dir outputs/tiny-position [--max_train_steps 600]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from boftvision.data.controlnet import write_triplets
from boftvision.data.shapes import control_example
from boftvision.generate import control_features, interpolation_path, labelled_grid
from boftvision.integrations.diffusers import attach_adapters, load_pipeline
from boftvision.training import RENAMED, describe_flags, run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import eval_control  # noqa: E402
import train_controlnet_boft  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/tiny-position")
    p.add_argument("--max_train_steps", "--steps", dest="steps", action=RENAMED, type=int, default=600)
    p.add_argument("--train_examples", type=int, default=512, help="generated training triplets")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = describe_flags(p).parse_args(argv)
    out = Path(args.output_dir)
    rng = np.random.default_rng(args.seed)
    train = write_triplets(out / "data" / "train", [control_example(rng, 32) for _ in range(args.train_examples)])
    test = write_triplets(out / "data" / "test", [control_example(rng, 32) for _ in range(16)])
    run = out / "run"
    train_controlnet_boft.main([
        "--train_data_dir", str(train), "--output_dir", str(run), "--adapter", "boft", "--boft_block_size", "8",
        "--boft_n_butterfly_factor", "2", "--learning_rate", str(args.learning_rate), "--train_batch_size", "16",
        "--max_train_steps", str(args.steps), "--checkpointing_steps", "200", "--seed", str(args.seed),
        "--resume_from_checkpoint", "latest", "--validation_image", str(test / "conditioning_images" / "00000.png"),
        "--validation_prompt", "a photo of a red circle", "--validation_steps", "200"])
    scores = eval_control.main(["--adapter_path", str(run), "--data_dir", str(test), "--compare_base",
                                "--out", str(out / "control_error.json")])
    pipe = load_pipeline()
    attach_adapters(pipe, run)
    control = test / "conditioning_images" / "00001.png"
    rows = [json.loads(line) for line in (test / "metadata.jsonl").read_text().splitlines()]
    path = interpolation_path(pipe, rows[1]["text"], seed=0, control=control_features(pipe, run, control))
    from PIL import Image

    path.insert(0, ("control", Image.open(control).convert("RGB")))
    labelled_grid(path).save(out / "interpolation.png")
    print(f"control error (1 − IoU): adapted {scores['adapted']['mask_error']:.3f}, "
          f"base {scores['base']['mask_error']:.3f}; grid: {out / 'interpolation.png'}")
    return scores


if __name__ == "__main__":
    run_cli(main)
