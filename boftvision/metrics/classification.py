"""Classification metrics, computed the same way during training and in the evaluation scripts."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def top1_accuracy(model: torch.nn.Module, loader, accelerator=None) -> float:
    """Percentage of correct arg-max predictions over the whole loader (gathered across processes)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        if accelerator is None:
            device = next(model.parameters()).device
            images, labels = images.to(device), labels.to(device)
        predictions = model(images).argmax(-1)
        if accelerator is not None:
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # average ranks of ties
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def glue_metrics(predictions, labels, regression: bool = False) -> dict[str, float]:
    """Accuracy, binary F1 and Matthews correlation (classification) or Pearson / Spearman
    (regression, STS-B); as percentages."""
    p, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    if regression:
        pearson = float(np.corrcoef(p, y)[0, 1])
        spearman = float(np.corrcoef(_ranks(p), _ranks(y))[0, 1])
        return {"pearson": 100 * pearson, "spearman": 100 * spearman}
    out = {"accuracy": 100 * float((p == y).mean())}
    classes = np.union1d(np.unique(p), np.unique(y))
    confusion = np.array([[np.sum((y == a) & (p == b)) for b in classes] for a in classes], dtype=float)
    n, correct = confusion.sum(), np.trace(confusion)
    t, pk = confusion.sum(1), confusion.sum(0)
    denom = np.sqrt((n * n - (pk * pk).sum()) * (n * n - (t * t).sum()))
    out["matthews"] = 100 * float((correct * n - (t * pk).sum()) / denom) if denom else 0.0
    if len(classes) <= 2:
        tp = np.sum((p == 1) & (y == 1))
        precision = tp / max(np.sum(p == 1), 1)
        recall = tp / max(np.sum(y == 1), 1)
        out["f1"] = 100 * float(2 * precision * recall / max(precision + recall, 1e-12))
    return out
