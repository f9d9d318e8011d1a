"""IoU and boundary IoU on hand-made masks with known answers."""
import torch

from boftvision.metrics.segmentation import boundary_iou, dataset_scores, mask_iou, mask_to_boundary


def square(size=100, top=20, side=20):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[top:top + side, top:top + side] = True
    return m


def test_boundary_band_width_follows_the_diagonal():
    # 100×100 image: diagonal 141.4 → round(2.83) = 3 pixels; a 20×20 square keeps a 14×14 interior
    band = mask_to_boundary(square())
    assert band.sum() == 400 - 14 * 14
    assert not band[25:35, 25:35].any() and band[20, 20] and band[22, 30] and not band[23, 30]


def test_mask_touching_the_image_edge_erodes_from_outside():
    full = torch.ones(10, 10, dtype=torch.bool)  # diagonal 14.1 → 1 pixel
    assert mask_to_boundary(full).sum() == 100 - 8 * 8


def test_iou_values():
    a, b = square(side=20), square(top=30, side=20)  # overlap 10×10
    assert mask_iou(a, b) == 100 / (400 + 400 - 100)
    assert mask_iou(a, a) == 1.0 and boundary_iou(a, a) == 1.0
    assert mask_iou(torch.zeros(5, 5), torch.zeros(5, 5)) == 1.0
    big, shifted = square(side=60), square(top=21, side=60)  # one-pixel shift: boundary IoU drops more
    assert mask_iou(big, shifted) > 0.9 and boundary_iou(big, shifted) < mask_iou(big, shifted) - 0.1


def test_dataset_scores_upsample_logits():
    gt = square()
    logits = torch.full((25, 25), -5.0)
    logits[5:10, 5:10] = 5.0  # the same square at quarter resolution
    scores = dataset_scores([(logits, gt), (-logits, gt)])
    assert scores["images"] == 2 and 45 < scores["mIoU"] < 51
