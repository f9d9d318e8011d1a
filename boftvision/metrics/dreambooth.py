"""DreamBooth scores: how faithful generated images are to the subject and to the prompt, and how much a
fine-tuned model still draws what it drew before (language drift).

With feature extractors (what the BOFT and DreamBooth papers report):
- subject fidelity, ``subject_similarity``: mean cosine similarity over all (generated, real) pairs of
  image embeddings — DINO ViT-S/16 CLS features ("DINO") or CLIP image features ("CLIP-I");
- prompt fidelity, ``prompt_similarity``: mean cosine between each image's CLIP embedding and its
  prompt's ("CLIP-T");
- diversity, ``within_prompt_distance``: mean perceptual distance (LPIPS) over pairs of images of the
  same prompt.

Detector-free, for the embedded shapes world (the colour and the shape of the one object, measured from
pixels): ``describe_shape`` names an image's object; ``fraction_drawn`` is the share of images whose
object is the one asked for. The subject score is the fraction of images of the instance prompt that show
the subject; prompt preservation is the fraction of colour × shape prompts still drawn correctly.
"""
from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def subject_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated, real) pair: ``generated`` (n, d), ``real`` (m, d)."""
    if generated.shape[-1] != real.shape[-1]:
        raise ValueError(f"feature widths differ: generated {generated.shape[-1]}, real {real.shape[-1]}")
    return float((_unit(generated) @ _unit(real).T).mean())


def prompt_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine similarity of image i to text i: both (n, d), row i of ``texts`` is image i's prompt."""
    if images.shape != texts.shape:
        raise ValueError(f"one text embedding per image is needed: images {tuple(images.shape)}, "
                         f"texts {tuple(texts.shape)}")
    return float((_unit(images) * _unit(texts)).sum(-1).mean())


def within_prompt_distance(distance: Callable[[Image.Image, Image.Image], float],
                           images_by_prompt: Sequence[Sequence[Image.Image]]) -> float:
    """Mean ``distance`` over all pairs of images of the same prompt (LPIPS diversity); a prompt needs at
    least two images."""
    values = [distance(a, b) for images in images_by_prompt for a, b in combinations(images, 2)]
    if not values:
        raise ValueError("diversity needs at least two images per prompt (more than one seed)")
    return float(np.mean(values))


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std", "n"} of a list of per-seed scores (population std, 0 for one value)."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


# --- detector-free: the embedded shapes world --------------------------------------------------------
def describe_shape(image: Image.Image, colours: dict[str, tuple[int, int, int]],
                   background: tuple[int, int, int], threshold: float = 60.0,
                   colour_tolerance: float = 90.0) -> tuple[str | None, str | None]:
    """(colour name, shape) of the one object in ``image``, measured from its pixels, or None for a part
    that cannot be told (no object, a colour far from every named one).

    Foreground: pixels farther than ``threshold`` (RGB distance) from ``background``. Colour: the named
    colour nearest the foreground's median, if within ``colour_tolerance``. Shape, from the foreground's
    bounding box: a hole at the object's centre → "ring"; else the filled share of the box —
    ≥ 0.88 "square", ≥ 0.66 "circle" (π/4 ≈ 0.79), below "triangle" (½)."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    mask = np.linalg.norm(pixels - np.asarray(background, np.float32), axis=-1) > threshold
    if mask.sum() < max(4, 0.01 * mask.size):
        return None, None
    rows, cols = np.nonzero(mask)
    median = np.median(pixels[mask], axis=0)
    names = list(colours)
    gaps = [np.linalg.norm(median - np.asarray(colours[n], np.float32)) for n in names]
    colour = names[int(np.argmin(gaps))] if min(gaps) <= colour_tolerance else None
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = bottom - top, right - left
    cy, cx = (top + bottom) // 2, (left + right) // 2  # the box's centre (a ring's centroid is its hole)
    k = max(1, min(height, width) // 8)
    centre = mask[cy - k:cy + k, cx - k:cx + k]
    if centre.size and centre.mean() < 0.25 and min(height, width) >= 6:
        return colour, "ring"
    fill = mask[top:bottom, left:right].mean()
    shape = "square" if fill >= 0.88 else "circle" if fill >= 0.66 else "triangle"
    return colour, shape


def fraction_drawn(described: Sequence[tuple[str | None, str | None]], wanted: Sequence[tuple[str, str]]) -> float:
    """The share of images whose (colour, shape) is the one wanted (image i ↔ ``wanted[i]``)."""
    if len(described) != len(wanted):
        raise ValueError(f"{len(described)} images but {len(wanted)} targets")
    return float(np.mean([tuple(d) == tuple(w) for d, w in zip(described, wanted)]))
