"""VTAB-1K in the layout NOAH / FacT / GLoRA use: ``<root>/<task>/`` holding images and the split files
``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt`` with lines ``<relative path> <label>``.

Protocol: 224×224 bicubic resize, ImageNet normalisation, no augmentation.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..files import inside_root, regular_file
from .images import check_images

TASKS = {  # task folder → number of classes
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
GROUPS = {
    "Natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "Specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "Structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"],
}
SPLITS = ("train800", "val200", "train800val200", "test")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vtab_transform(image_size: int = 224):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class VTABDataset(Dataset):
    """One split of one task; every listed file and label is checked when the dataset is built."""

    def __init__(self, root: str | Path, task: str, split: str, image_size: int = 224,
                 num_classes: int | None = None, allow_outside: bool = False, skip_bad: bool = False):
        if split not in SPLITS:
            raise ValueError(f"unknown VTAB split {split!r}; use one of {SPLITS}")
        folder = Path(root) / task
        if not folder.is_dir():
            raise FileNotFoundError(f"VTAB task folder {folder} not found; expected <root>/<task>/ as in "
                                    f"NOAH's vtab-1k release (tasks: {', '.join(TASKS)})")
        listing = folder / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} is missing: each task folder holds "
                                    f"{', '.join(s + '.txt' for s in SPLITS)}")
        self.num_classes = num_classes or TASKS.get(task)
        if self.num_classes is None:
            raise ValueError(f"task {task!r} is not one of the 19 VTAB tasks; pass num_classes for other folders")
        self.samples = []
        for lineno, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rel, label = line.rsplit(maxsplit=1)
            path, label = inside_root(folder, rel, f"{listing}:{lineno}", allow_outside), int(label)
            if not path.exists():
                raise FileNotFoundError(f"{listing}:{lineno} names {rel}, which does not exist in {folder}")
            regular_file(path, f"{listing}:{lineno}")
            if not 0 <= label < self.num_classes:
                raise ValueError(f"{listing}:{lineno}: label {label} is outside [0, {self.num_classes}) for {task}")
            self.samples.append((path, label))
        good = set(check_images([p for p, _ in self.samples], str(listing), skip_bad))
        self.samples = [(p, label) for p, label in self.samples if p in good]
        self.transform = vtab_transform(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label
