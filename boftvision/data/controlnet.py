"""ControlNet-style triplets (image, conditioning image, caption) in the layout diffusers' ControlNet
example reads: a folder with ``metadata.jsonl``, one JSON object per line naming the image file, the
conditioning-image file and the caption (column names configurable)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..files import inside_root, regular_file
from .dreambooth import tokenize
from .images import check_images


def read_metadata(folder: str | Path, image_column: str = "image",
                  conditioning_image_column: str = "conditioning_image", caption_column: str = "text",
                  allow_outside: bool = False, skip_bad: bool = False) -> list[dict]:
    """Rows of ``folder/metadata.jsonl`` with file paths resolved and checked (clear errors): regular
    files inside ``folder`` only, unless ``allow_outside``."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: a ControlNet data folder holds metadata.jsonl with "
                                f'"{image_column}", "{conditioning_image_column}" and "{caption_column}" per line')
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        for column in (image_column, conditioning_image_column, caption_column):
            if column not in row:
                raise ValueError(f"{meta} line {n} has no {column!r} (keys: {sorted(row)}); set the column "
                                 "names with --image_column/--conditioning_image_column/--caption_column")
        paths = {}
        for column in (image_column, conditioning_image_column):
            where = f"{meta} line {n}: {column}"
            path = inside_root(folder, str(row[column]), where, allow_outside)
            if not path.exists():
                raise FileNotFoundError(f"{where} file {path} is missing")
            paths[column] = regular_file(path, where)
        with Image.open(paths[image_column]) as a, Image.open(paths[conditioning_image_column]) as b:
            if a.size != b.size:
                raise ValueError(f"{meta} line {n}: image {paths[image_column].name} is {a.size[0]}×{a.size[1]} "
                                 f"but conditioning image {paths[conditioning_image_column].name} is "
                                 f"{b.size[0]}×{b.size[1]}; they must be pixel-aligned")
        rows.append({"image": paths[image_column], "control": paths[conditioning_image_column],
                     "text": row[caption_column]})
    if not rows:
        raise ValueError(f"{meta} is empty")
    good = set(check_images([r[k] for r in rows for k in ("image", "control")], str(meta), skip_bad))
    return [r for r in rows if r["image"] in good and r["control"] in good]


def to_tensor(image: Image.Image, size: int, signed: bool) -> torch.Tensor:
    """Resize to size×size; [−1, 1] for images the VAE encodes, [0, 1] for control signals."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    return tensor * 2 - 1 if signed else tensor


class ControlDataset(Dataset):
    def __init__(self, folder, tokenizer, size: int, **options):
        self.rows, self.tokenizer, self.size = read_metadata(folder, **options), tokenizer, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"pixels": to_tensor(Image.open(row["image"]), self.size, signed=True),
                "control": to_tensor(Image.open(row["control"]), self.size, signed=False),
                "ids": tokenize(self.tokenizer, row["text"])}


def write_triplets(folder: str | Path, examples) -> Path:
    """Save (image, control, caption) triplets in the layout above (used for generated data)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "conditioning_images").mkdir(exist_ok=True)
    lines = []
    for i, (image, control, text) in enumerate(examples):
        image.save(folder / "images" / f"{i:05d}.png")
        control.save(folder / "conditioning_images" / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"images/{i:05d}.png",
                                 "conditioning_image": f"conditioning_images/{i:05d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
