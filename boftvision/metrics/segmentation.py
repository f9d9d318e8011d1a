"""Mask IoU and boundary IoU as HQ-SAM reports them (per image, then averaged per dataset).

Boundary of a mask = the mask minus its erosion by ``round(0.02 × image diagonal)`` pixels (at least 1)
with a 3×3 structuring element, pixels outside the image counting as background — HQ-SAM's
``mask_to_boundary``. Predictions (logits) are bilinearly resized to the ground truth and thresholded at 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mask_to_boundary(mask: torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """(H, W) binary mask → its inner boundary band (H, W) bool."""
    h, w = mask.shape[-2:]
    k = max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))
    inverse = 1.0 - mask.float().reshape(1, 1, h, w)
    # erosion by a (2k+1)² square (= k iterations of 3×3) with background outside the image
    grown = F.max_pool2d(F.pad(inverse, (k, k, k, k), value=1.0), 2 * k + 1, stride=1)
    eroded = (1.0 - grown).reshape(h, w) > 0.5
    return mask.bool() & ~eroded


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    return _iou(pred.bool(), gt.bool())


def boundary_iou(pred: torch.Tensor, gt: torch.Tensor, dilation_ratio: float = 0.02) -> float:
    return _iou(mask_to_boundary(pred, dilation_ratio), mask_to_boundary(gt, dilation_ratio))


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) low-resolution logits → (H, W) bool mask at the ground truth's size."""
    up = F.interpolate(logits.float().reshape(1, 1, *logits.shape[-2:]), size=size, mode="bilinear",
                       align_corners=False)
    return up.reshape(size) > 0


def dataset_scores(pairs) -> dict[str, float]:
    """Mean IoU and boundary IoU (percent) over (logits, gt mask) pairs of one dataset."""
    ious, bious = [], []
    for logits, gt in pairs:
        pred = logits_to_mask(logits, tuple(gt.shape[-2:]))
        ious.append(mask_iou(pred, gt))
        bious.append(boundary_iou(pred, gt))
    n = max(len(ious), 1)
    return {"mIoU": 100 * sum(ious) / n, "mBIoU": 100 * sum(bious) / n, "images": len(ious)}
