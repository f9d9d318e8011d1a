"""Segment Anything (``segment-anything``): adapters on the mask decoder's linear layers only, image and
prompt encoders frozen; decoding from cached image embeddings with box / point / coarse-mask prompts.

The decoder's cross-attention projects 256 → 128 (downsample rate 2): block sizes and VB-LoRA vector
lengths must divide 128 as well as 256.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_ATTENTION = (r"transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
              r"|final_attn_token_to_image)\.(q_proj|k_proj|v_proj|out_proj)")
_MLP = r"transformer\.layers\.\d+\.mlp\.lin[12]"
_HEADS = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.\d+"
# regexes over the names inside a Sam model ("mask_decoder." prefix) or a bare MaskDecoder
PRESETS = {
    "decoder_attention": rf"(mask_decoder\.)?{_ATTENTION}",
    "decoder_transformer": rf"(mask_decoder\.)?({_ATTENTION}|{_MLP})",
    "decoder_all_linear": rf"(mask_decoder\.)?({_ATTENTION}|{_MLP}|{_HEADS})",
}


def load_sam(model_type: str, checkpoint: str | None = None):
    """``vit_b`` / ``vit_l`` / ``vit_h`` from segment-anything, weights from a local checkpoint file."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM type {model_type!r}; use one of {sorted(sam_model_registry)}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"SAM checkpoint {checkpoint} not found (e.g. sam_vit_h_4b8939.pth)")
    try:
        return sam_model_registry[model_type](checkpoint=checkpoint)
    except RuntimeError as err:
        if "size mismatch" not in str(err) and "Missing key" not in str(err):
            raise
        raise ValueError(f"SAM checkpoint {checkpoint} does not match --model_type {model_type} (its tensors have "
                         "other shapes); pass the matching --model_type, or --sam_config for a SAM outside the "
                         "registry") from None


def sam_mask_decoder(transformer_dim: int = 256, depth: int = 2, mlp_dim: int = 2048, num_heads: int = 8):
    """A MaskDecoder as SAM builds it (the same for ViT-B/L/H); random weights, for counting/tests."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    return MaskDecoder(transformer_dim=transformer_dim, num_multimask_outputs=3, iou_head_depth=3,
                       iou_head_hidden_dim=transformer_dim,
                       transformer=TwoWayTransformer(depth=depth, embedding_dim=transformer_dim, mlp_dim=mlp_dim,
                                                     num_heads=num_heads))


def preprocess(sam, image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, S, S) normalised and padded, longest side resized to S (SAM's input)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    size = sam.image_encoder.img_size
    resized = ResizeLongestSide(size).apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None].float()
    return sam.preprocess(x)


@torch.no_grad()
def embedding_cache(cache_dir: str | Path | None, model_type: str | None, checkpoint: str | None,
                    sam_config: str | None = None) -> Path | None:
    """``cache_dir/<key>``: one subfolder per image encoder (type or config, and the checkpoint file's
    path, size and time), so a cache shared between two SAMs never hands one the other's embeddings."""
    if not cache_dir:
        return None
    import hashlib
    import json

    stat = Path(checkpoint).stat() if checkpoint else None
    key = json.dumps({"type": model_type, "config": Path(sam_config).read_text() if sam_config else None,
                      "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
                      "size": stat.st_size if stat else None, "mtime": stat.st_mtime_ns if stat else None},
                     sort_keys=True)
    return Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]


def image_embedding(sam, image: np.ndarray, cache: Path | None = None) -> torch.Tensor:
    """The frozen image encoder's output (1, C, h, w); read from/written to ``cache`` when given."""
    if cache is not None and cache.is_file():
        return torch.load(cache, map_location=sam.device, weights_only=True)
    embedding = sam.image_encoder(preprocess(sam, image))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(embedding.cpu(), cache)
    return embedding


def decode(sam, embedding: torch.Tensor, original_size: tuple[int, int], box=None, points=None,
           coarse_mask=None) -> torch.Tensor:
    """Low-resolution mask logits (1, 1, 4h, 4w) for one image and one prompt, in original-image
    coordinates (box: (4,) x0 y0 x1 y1; points: ((k, 2), (k,) labels); coarse_mask: (1, 1, 4h, 4w) logits)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = embedding.device
    if box is not None:
        box = torch.as_tensor(transform.apply_boxes(np.asarray(box, dtype=np.float32)[None], original_size),
                              device=device)
    if points is not None:
        coords = transform.apply_coords(np.asarray(points[0], dtype=np.float32), original_size)
        points = (torch.as_tensor(coords, device=device)[None], torch.as_tensor(points[1], device=device)[None])
    sparse, dense = sam.prompt_encoder(points=points, boxes=box, masks=coarse_mask)
    logits, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)
    return logits


def logits_to_original(sam, logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits → logits at the original image size (SAM's postprocess: unpad, resize)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    size = sam.image_encoder.img_size
    input_size = ResizeLongestSide(size).get_preprocess_shape(*original_size, size)
    return sam.postprocess_masks(logits, input_size, original_size)[0, 0]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice on the full low-resolution mask (HQ-SAM samples uncertain points instead; this is the
    simpler documented variant)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def freeze_encoders(sam: nn.Module) -> None:
    sam.image_encoder.requires_grad_(False)
    sam.prompt_encoder.requires_grad_(False)


def build_sam(config: dict, checkpoint: str | None = None):
    """A SAM of any size from a dict (img_size, patch_size, embed_dim, depth, num_heads, out_chans,
    window_size, global_attn_indexes, decoder_depth, decoder_mlp_dim, decoder_heads), weights from a
    state-dict file — for SAM variants outside the registry (and the tests' tiny model)."""
    from segment_anything.modeling import ImageEncoderViT, PromptEncoder, Sam

    c = {"img_size": 1024, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "out_chans": 256,
         "window_size": 14, "global_attn_indexes": (2, 5, 8, 11), "decoder_depth": 2, "decoder_mlp_dim": 2048,
         "decoder_heads": 8, **config}
    grid = c["img_size"] // c["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"],
                                      depth=c["depth"], num_heads=c["num_heads"], out_chans=c["out_chans"],
                                      window_size=c["window_size"],
                                      global_attn_indexes=tuple(c["global_attn_indexes"]),
                                      use_rel_pos=True),
        prompt_encoder=PromptEncoder(embed_dim=c["out_chans"], image_embedding_size=(grid, grid),
                                     input_image_size=(c["img_size"], c["img_size"]), mask_in_chans=16),
        mask_decoder=sam_mask_decoder(c["out_chans"], c["decoder_depth"], c["decoder_mlp_dim"], c["decoder_heads"]),
    )
    if checkpoint is not None:
        try:
            sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        except RuntimeError as err:
            if "size mismatch" not in str(err) and "Missing key" not in str(err):
                raise
            raise ValueError(f"SAM checkpoint {checkpoint} does not match --sam_config (its tensors have other "
                             "shapes); pass the config the checkpoint was made with") from None
    return sam


def coarse_mask_prompt(sam, mask: np.ndarray, rng: np.random.Generator, noise: float = 0.5) -> torch.Tensor:
    """A noised low-resolution logit mask of the ground truth in SAM's padded input frame (1, 1, 4h, 4w)."""
    size = sam.image_encoder.img_size
    h, w = mask.shape
    scale = size / max(h, w)
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=(int(h * scale + 0.5), int(w * scale + 0.5)), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, size - m.shape[-1], 0, size - m.shape[-2]))
    low = sam.prompt_encoder.mask_input_size
    m = F.interpolate(m, size=low, mode="bilinear", align_corners=False)
    logits = (m * 2 - 1) * 4 + torch.as_tensor(rng.normal(0, noise * 4, m.shape), dtype=torch.float32)
    return logits.to(sam.device)


@torch.no_grad()
def evaluate_sets(sam, datasets: dict, cache_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Per-dataset mIoU / mBIoU with tight box prompts — used by training-time validation and the
    standalone evaluation script alike."""
    from ..data.hqseg import mask_box
    from ..metrics.segmentation import boundary_iou, mask_iou

    was_training = sam.training
    sam.eval()
    scores = {}
    for name, dataset in datasets.items():
        ious, bious = [], []
        for i in range(len(dataset)):
            image, mask, stem = dataset[i]
            cache = cache_dir / name / f"{stem}.pt" if cache_dir else None
            embedding = image_embedding(sam, image, cache)
            logits = decode(sam, embedding, mask.shape, box=mask_box(mask))
            pred = logits_to_original(sam, logits, mask.shape) > 0
            gt = torch.as_tensor(mask, device=pred.device)
            ious.append(mask_iou(pred, gt))
            bious.append(boundary_iou(pred, gt))
        scores[name] = {"mIoU": 100 * float(np.mean(ious)), "mBIoU": 100 * float(np.mean(bious)), "images": len(ious)}
    sam.train(was_training)
    return scores


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """The paper's format: mIoU / mBIoU per dataset and their mean."""
    names = list(scores)
    head = "| " + " | ".join(f"{n} mIoU | {n} mBIoU" for n in names) + " | mean mIoU | mean mBIoU |"
    cells = " | ".join(f"{scores[n]['mIoU']:.1f} | {scores[n]['mBIoU']:.1f}" for n in names)
    mean_iou = np.mean([scores[n]["mIoU"] for n in names])
    mean_biou = np.mean([scores[n]["mBIoU"] for n in names])
    return f"{head}\n|{'---|' * (2 * len(names) + 2)}\n| {cells} | {mean_iou:.1f} | {mean_biou:.1f} |\n"
