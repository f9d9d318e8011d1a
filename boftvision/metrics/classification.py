"""Top-1 accuracy, computed the same way during training and in the evaluation scripts."""
from __future__ import annotations

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
