"""Control error: how far generated images are from their control signals.

- ``mask_iou_error``: detector-free, for position/mask controls — 1 − IoU between the control mask and
  the generated image's foreground (what the tests and the embedded demo use).
- ``landmark_error``: the BOFT paper's face-landmark metric — mean L2 pixel distance over 68 landmarks
  between the generated image and the control's source, with any detector the user installs
  (``face_alignment``); images where detection fails are counted and reported, not silently dropped.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def mask_iou_error(control_mask: np.ndarray, generated_mask: np.ndarray) -> float:
    """1 − IoU of two boolean masks of the same shape (0 = the object exactly where the control says)."""
    if control_mask.shape != generated_mask.shape:
        raise ValueError(f"mask shapes differ: control {control_mask.shape}, generated {generated_mask.shape}")
    union = np.logical_or(control_mask, generated_mask).sum()
    if union == 0:
        return 0.0
    return 1.0 - float(np.logical_and(control_mask, generated_mask).sum() / union)


def landmark_error(detect: Callable[[np.ndarray], np.ndarray | None], generated: list[np.ndarray],
                   targets: list[np.ndarray]) -> dict:
    """Mean landmark distance (pixels) over images where ``detect`` finds a face; returns the error,
    the detection rate and the count. ``detect(image) -> (68, 2) array or None``; ``targets`` are the
    ground-truth landmarks (68, 2) of each control."""
    distances, found = [], 0
    for image, target in zip(generated, targets):
        points = detect(image)
        if points is None:
            continue
        found += 1
        distances.append(float(np.linalg.norm(np.asarray(points)[:68] - np.asarray(target)[:68], axis=-1).mean()))
    n = len(generated)
    return {"landmark_error": float(np.mean(distances)) if distances else float("nan"),
            "detection_rate": found / n if n else float("nan"), "images": n}


def face_alignment_detector(device: str = "cpu") -> Callable[[np.ndarray], np.ndarray | None]:
    """68-point 2D landmarks from the ``face-alignment`` package (``pip install face-alignment``)."""
    try:
        import face_alignment
    except ImportError as err:
        raise ImportError("landmark error needs a detector: pip install face-alignment "
                          "(or pass your own detect function)") from err
    model = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device)

    def detect(image: np.ndarray) -> np.ndarray | None:
        found = model.get_landmarks(image)
        return None if not found else found[0]

    return detect
