"""HQSeg-44K as HQ-SAM's release lays it out (under one data root), and the prompts HQ-SAM trains with.

Pairs are found as ``im``/``gt``, ``images``/``masks`` (or ``images_*``/``masks_*``) folders, or image
and mask files side by side (``x.jpg`` + ``x.png``). Masks are binarised at > 128.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..files import is_regular_file
from .images import check_images

# name → (image dir, mask dir) relative to the data root, as HQ-SAM's training script uses them
TRAIN_SETS = {
    "DIS5K-TR": ("DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt"),
    "ThinObject5K-TR": ("thin_object_detection/ThinObject5K/images_train",
                        "thin_object_detection/ThinObject5K/masks_train"),
    "FSS-1000": ("cascade_psp/fss_all", "cascade_psp/fss_all"),
    "DUTS-TR": ("cascade_psp/DUTS-TR", "cascade_psp/DUTS-TR"),
    "DUTS-TE": ("cascade_psp/DUTS-TE", "cascade_psp/DUTS-TE"),
    "ECSSD": ("cascade_psp/ecssd", "cascade_psp/ecssd"),
    "MSRA-10K": ("cascade_psp/MSRA_10K", "cascade_psp/MSRA_10K"),
}
EVAL_SETS = {
    "DIS5K-VD": ("DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt"),
    "COIFT": ("thin_object_detection/COIFT/images", "thin_object_detection/COIFT/masks"),
    "HRSOD": ("thin_object_detection/HRSOD/images", "thin_object_detection/HRSOD/masks_max255"),
    "ThinObject5K-TE": ("thin_object_detection/ThinObject5K/images_test",
                        "thin_object_detection/ThinObject5K/masks_test"),
}
IMAGE_EXT, MASK_EXT = (".jpg", ".jpeg"), (".png",)


def find_pairs(image_dir: str | Path, mask_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem; an image without a mask is an error."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found; HQSeg-44K folders go under the data root as HQ-SAM lays them out")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in MASK_EXT and is_regular_file(p)}
    pairs, unpaired = [], []  # regular files only: a folder or FIFO named x.jpg is not an image
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXT and is_regular_file(p)):
        (pairs.append((image, masks[image.stem])) if image.stem in masks else unpaired.append(image.name))
    if unpaired:
        raise FileNotFoundError(f"{len(unpaired)} image(s) in {image_dir} have no mask in {mask_dir} "
                                f"(same name, .png): {unpaired[:3]}")
    if not pairs:
        raise FileNotFoundError(f"no .jpg images with .png masks in {image_dir}")
    return pairs


class HQSegDataset:
    """(image uint8 (H, W, 3), mask bool (H, W), name) for the pairs of one or more folders."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        self.pairs = pairs

    @classmethod
    def from_sets(cls, root: str | Path, names: list[str], skip_bad: bool = False) -> "HQSegDataset":
        known = {**TRAIN_SETS, **EVAL_SETS}
        pairs = []
        for name in names:
            if name not in known:
                raise ValueError(f"unknown HQSeg set {name!r}; known: {sorted(known)}")
            pairs += find_pairs(Path(root) / known[name][0], Path(root) / known[name][1])
        good = set(check_images([p for pair in pairs for p in pair], f"HQSeg {', '.join(names)}", skip_bad))
        return cls([(image, mask) for image, mask in pairs if image in good and mask in good])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(mask_path).convert("L")) > 128
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask is {mask.shape}, image {image_path.name} is {image.shape[:2]}")
        if not mask.any():
            raise ValueError(f"{mask_path} is empty (no pixel > 128); remove the pair or fix the mask")
        return image, mask, image_path.stem


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight x0, y0, x1, y1 box of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def noisy_box(mask: np.ndarray, rng: np.random.Generator, scale: float = 0.1) -> np.ndarray:
    """The mask's box with each side jittered by N(0, scale·side length), clipped to the image."""
    box = mask_box(mask)
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    box = box + rng.normal(0, scale, 4) * np.array([w, h, w, h])
    return np.clip(box, 0, [mask.shape[1] - 1, mask.shape[0] - 1] * 2).astype(np.float32)


def random_points(mask: np.ndarray, rng: np.random.Generator, k: int = 3):
    """k foreground points (x, y) with label 1."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(0, len(xs), k)
    return np.stack([xs[pick], ys[pick]], 1).astype(np.float32), np.ones(k, dtype=np.int64)
