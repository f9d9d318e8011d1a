"""Generated images of coloured shapes with captions: the data the embedded tiny Stable Diffusion model
is trained on, and the bundled DreamBooth subject it has never seen.

Captions read ``"a photo of a red circle"``; one in four is the class caption ``"a photo of a shape"``
(so the class prompt of DreamBooth's prior preservation means "some shape"). The DreamBooth subject,
``"a photo of sks shape"``, is a red ring: a shape the base model never saw. (Its colour is a base one
on purpose: the tiny VAE, trained on these four colours only, decodes a purple ring as a green one.)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
SUBJECT_COLOUR = (220, 40, 40)  # red, a base colour: the tiny VAE only reconstructs those
WORDS = ["a", "photo", "of", "shape", "sks", "on", "the", "left", "right", *COLOURS, *SHAPES]
INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"


def caption(colour: str, shape: str) -> str:
    """The caption of one coloured shape, as the embedded model was trained on it: "a photo of a red circle"."""
    return f"a photo of a {colour} {shape}"


def _mask(kind: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    if kind == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    if kind == "triangle":  # apex up
        top, bottom = cy - r, cy + r * 0.8
        half = (yy - top) / (bottom - top) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    if kind == "ring":
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        return (d2 <= r ** 2) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}; use one of {SHAPES + ('ring',)}")


def render(kind: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator,
           stripes: bool = False) -> Image.Image:
    """One shape at a jittered centre and size on a light background, with a little pixel noise."""
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    r = rng.uniform(0.24, 0.32) * size
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    mask = _mask(kind, size, cx, cy, r)
    paint = np.empty_like(image)
    paint[:] = colour
    if stripes:  # diagonal stripes in the second colour (the subject's texture)
        yy, xx = np.mgrid[0:size, 0:size]
        band = ((xx + yy) // max(2, size // 10)) % 2 == 1
        paint[band] = (120, 30, 160)
    image[mask] = paint[mask]
    image += rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def base_example(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A random base-training pair: coloured shape and its caption (one in four: the class caption)."""
    kind = SHAPES[rng.integers(len(SHAPES))]
    name = list(COLOURS)[rng.integers(len(COLOURS))]
    text = CLASS_PROMPT if rng.random() < 0.25 else caption(name, kind)
    return render(kind, COLOURS[name], size, rng), text


def instance_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """The DreamBooth subject ("sks shape"): a red ring, n views."""
    rng = np.random.default_rng(seed)
    return [render("ring", SUBJECT_COLOUR, size, rng) for _ in range(n)]


def position_map(size: int, cx: float, cy: float, r: float) -> Image.Image:
    """The control signal of the shape-position task: a white disk where the object must be, on black."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    return Image.fromarray((disk * 255).astype(np.uint8)).convert("RGB")


def control_example(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image, str]:
    """(image, position map, caption): a coloured shape anywhere in the frame (not only near the
    centre, where the base model puts it) and the disk marking its place."""
    kind = SHAPES[rng.integers(len(SHAPES))]
    name = list(COLOURS)[rng.integers(len(COLOURS))]
    r = rng.uniform(0.2, 0.26) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    image[_mask(kind, size, cx, cy, r)] = COLOURS[name]
    image += rng.normal(0, 4, image.shape)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return picture, position_map(size, cx, cy, r), caption(name, kind)


def foreground(image: Image.Image, threshold: float = 60.0) -> np.ndarray:
    """Pixels that are not the light background (the shape), as a boolean mask."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    return np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > threshold
