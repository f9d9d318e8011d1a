"""DreamBooth folders: the subject's images with the instance prompt, optionally class images with the
class prompt (prior preservation), as diffusers' DreamBooth scripts read them."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..files import is_regular_file
from .images import check_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(folder: str | Path, what: str, check: bool = False, skip_bad: bool = False) -> list[Path]:
    """The folder's images (regular files with an image suffix), sorted; ``check`` decodes each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} does not exist")
    named = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = [p for p in named if is_regular_file(p)]  # a folder or FIFO named x.png is not an image
    if len(images) < len(named):
        skipped = [p.name for p in named if p not in images]
        warnings.warn(f"{what} {folder}: skipping {skipped[:5]}, not regular files (folders, FIFOs, devices)",
                      stacklevel=2)
    if not images:
        raise ValueError(f"{what} {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put the "
                         "subject's photos there")
    return check_images(images, f"{what} {folder}", skip_bad) if check else images


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids padded to the tokenizer's length; a longer prompt is truncated with a warning."""
    full = tokenizer(prompt).input_ids
    if len(full) > tokenizer.model_max_length:
        kept = tokenizer.decode(full[1:tokenizer.model_max_length - 1])
        warnings.warn(f"prompt {prompt!r} has {len(full)} tokens, more than the text encoder's "
                      f"{tokenizer.model_max_length}; it is truncated to {kept!r}", stacklevel=2)
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


class DreamBoothDataset(Dataset):
    """Instance images with the instance prompt (+ class images with the class prompt), resized to
    ``size``, center- or randomly cropped, flipped at random, scaled to [−1, 1]."""

    def __init__(self, instance_dir, instance_prompt, tokenizer, size, center_crop=False,
                 class_dir=None, class_prompt=None, skip_bad_files=False, interpolation: str = "bilinear"):
        self.instances = list_images(instance_dir, "--instance_data_dir", True, skip_bad_files)
        self.classes = list_images(class_dir, "--class_data_dir", True, skip_bad_files) if class_dir else []
        self.size, self.center_crop = size, center_crop
        self.resample = getattr(Image.Resampling, interpolation.upper())
        self.instance_ids = tokenize(tokenizer, instance_prompt)
        self.class_ids = tokenize(tokenizer, class_prompt) if class_dir else None

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def load(self, path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        scale = self.size / min(image.size)
        image = image.resize((max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))),
                             self.resample)
        if self.center_crop:
            left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        else:
            left = int(torch.randint(0, image.width - self.size + 1, ()))
            top = int(torch.randint(0, image.height - self.size + 1, ()))
        image = image.crop((left, top, left + self.size, top + self.size))
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)

    def __getitem__(self, i: int) -> dict:
        item = {"pixels": self.load(self.instances[i % len(self.instances)]), "ids": self.instance_ids}
        if self.classes:
            item |= {"class_pixels": self.load(self.classes[i % len(self.classes)]), "class_ids": self.class_ids}
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, class examples second, in one batch (the loss splits it in halves)."""
    pixels, ids = [i["pixels"] for i in items], [i["ids"] for i in items]
    if "class_pixels" in items[0]:
        pixels += [i["class_pixels"] for i in items]
        ids += [i["class_ids"] for i in items]
    return {"pixels": torch.stack(pixels), "ids": torch.stack(ids)}
