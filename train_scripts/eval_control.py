"""Control error of a trained control encoder + adapter: generate one image per test triplet under its
control signal and measure how far the image is from what the control asks.

    python train_scripts/eval_control.py --adapter_path outputs/control --data_dir test-triplets \
        --control_type mask --compare_base --out outputs/control/control_error.json

Control types:
- ``mask`` (detector-free): the control is a mask of where the object must be (white on black); the
  generated object is the set of pixels that differ from the background (the median border colour);
  error = 1 − IoU, averaged over the test set.
- ``landmarks`` (the BOFT paper's face task): mean L2 distance in pixels over 68 landmarks between the
  generated image and the ground-truth image, detected with ``face-alignment`` (install it); the
  detection rate is reported, since the error only means something when every image yields one.
``--compare_base`` also scores the base model (no adapter, no control) on the same prompts and seeds.
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from boftvision.data.controlnet import read_metadata
from boftvision.files import write_text_atomic
from boftvision.generate import control_features, generate
from boftvision.inject import disable_adapter
from boftvision.integrations.diffusers import EMBEDDED, adapter_parts, attach_adapters, load_pipeline
from boftvision.metrics.control import face_alignment_detector, landmark_error, mask_iou_error
from boftvision.training import RENAMED, describe_flags, run_cli


def object_mask(image: Image.Image, threshold: float = 60.0) -> np.ndarray:
    """Pixels farther than ``threshold`` (RGB distance) from the median border colour."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > threshold


def control_mask(control: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(control.convert("L").resize(size, Image.NEAREST)) > 127


def evaluate(pipe, adapter_dir, rows, control_type: str, seed: int, steps: int, guidance_scale: float,
             use_control: bool = True, detect=None) -> dict:
    errors, generated, targets = [], [], []
    for i, row in enumerate(tqdm(rows, desc="control error", leave=False)):
        features = control_features(pipe, adapter_dir, row["control"]) if use_control else None
        image = generate(pipe, row["text"], seed + i, steps, guidance_scale, control=features)[0]
        if control_type == "mask":
            errors.append(mask_iou_error(control_mask(Image.open(row["control"]), image.size), object_mask(image)))
        else:
            generated.append(np.asarray(image.resize(Image.open(row["image"]).size)))
            targets.append(detect(np.asarray(Image.open(row["image"]).convert("RGB"))))
    if control_type == "mask":
        return {"mask_error": float(np.mean(errors)), "mean_iou": float(1 - np.mean(errors)), "images": len(errors)}
    keep = [k for k, t in enumerate(targets) if t is not None]
    scores = landmark_error(detect, [generated[k] for k in keep], [targets[k] for k in keep])
    scores["ground_truth_detection_rate"] = len(keep) / len(targets) if targets else float("nan")
    return scores


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="model", action=RENAMED,
                   default=str(EMBEDDED), help="the base pipeline (folder or hub id)")
    p.add_argument("--adapter_path", "--adapter", dest="adapter", action=RENAMED,
                   required=True, help="output_dir of train_controlnet_boft.py")
    p.add_argument("--data_dir", required=True, help="test triplets: folder with metadata.jsonl")
    p.add_argument("--allow_paths_outside_data_dir", action="store_true",
                   help="let metadata.jsonl name files outside --data_dir (absolute or ../ paths)")
    p.add_argument("--control_type", choices=["mask", "landmarks"], default="mask",
                   help="what to measure: mask (IoU error) or landmarks (face alignment)")
    p.add_argument("--num_images", type=int, default=None, help="first N triplets (default: all)")
    p.add_argument("--num_inference_steps", "--steps", dest="steps", action=RENAMED, type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare_base", action="store_true", help="also measure the base model without the adapter")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="a JSON file for the scores (default: printed only)")
    args = describe_flags(p).parse_args(argv)
    rows = read_metadata(args.data_dir, allow_outside=args.allow_paths_outside_data_dir)[:args.num_images]
    detect = face_alignment_detector(args.device) if args.control_type == "landmarks" else None
    pipe = load_pipeline(args.model, device=args.device)
    if "unet" in adapter_parts_or_none(args.adapter):
        attach_adapters(pipe, args.adapter)
    common = (args.control_type, args.seed, args.steps, args.guidance_scale)
    result = {"adapted": evaluate(pipe, args.adapter, rows, *common, detect=detect)}
    if args.compare_base:
        with disable_adapter(pipe.unet) if "unet" in adapter_parts_or_none(args.adapter) else nullcontext():
            result["base"] = evaluate(pipe, args.adapter, rows, *common, use_control=False, detect=detect)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1))
    return result


def adapter_parts_or_none(adapter_dir) -> list[str]:
    """The adapter parts in ``adapter_dir`` (none for a control-encoder-only run: --adapter none)."""
    try:
        return list(adapter_parts(adapter_dir))
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    run_cli(main)
