"""Counts on DINOv2-large (meta device) against the BOFT paper's table (docs/parameter_counts.md)."""
import sys
from pathlib import Path

import pytest
from transformers import Dinov2Model

import boftvision as bv
from boftvision.integrations.dinov2 import PRESETS, dinov2_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from parameter_counts import count, deberta_v3_base, roberta_large  # noqa: E402


@pytest.mark.parametrize("config,trainable,stored,paper", [
    (bv.LoRAConfig(r=4), 1_769_472, 1_769_472, 1_769_472),
    (bv.BOFTConfig(block_size=8, n_butterfly_factor=2), 3_760_128, 1_769_472, 1_990_656),
    (bv.BOFTConfig(block_size=2, n_butterfly_factor=6), 2_875_392, 884_736, 1_105_920),
    (bv.OFTConfig(block_size=16), 1_658_880, 1_658_880, 2_101_248),
])
def test_dinov2_large_counts(config, trainable, stored, paper):
    config.target_modules = PRESETS["all_linear"]
    assert count(lambda: Dinov2Model(dinov2_config("large")), config) == (trainable, stored, paper)


@pytest.mark.parametrize("config,paper", [
    (bv.LoRAConfig(r=8), 1_327_104), (bv.OFTConfig(block_size=16), 787_968),
    (bv.BOFTConfig(block_size=8, n_butterfly_factor=2), 746_496),
])
def test_deberta_v3_base_counts(config, paper):
    from boftvision.integrations.language import PRESETS as LM

    config.target_modules = LM["deberta-v2"]["all_linear"]
    assert count(deberta_v3_base, config)[2] == paper  # paper: 1.33M, 0.79M, 0.75M


def test_roberta_large_vblora_stored_count():
    from boftvision.integrations.language import PRESETS as LM

    config = bv.VBLoRAConfig(r=4, num_vectors=90, vector_length=256, topk=2,
                             target_modules=LM["roberta"]["all_linear"])
    assert count(roberta_large, config)[1] == 90 * 256 + round(1.5 * 24 * 4 * (4 * 8 + 2 * 20))


@pytest.mark.parametrize("m,b", [(4, 4), (2, 8)])
def test_sam_decoder_boft_counts_follow_the_formula(m, b):
    """Stored = Σ over adapted layers of m·(d/b)·b(b−1)/2 skew entries + n scales, from the layer shapes."""
    from boftvision.inject import find_targets
    from boftvision.integrations.sam import PRESETS as SAM
    from boftvision.integrations.sam import sam_mask_decoder

    layers = find_targets(sam_mask_decoder(), bv.LoRAConfig(target_modules=SAM["decoder_attention"])).values()
    assert len(layers) == 28
    expected = sum(m * (layer.in_features // b) * b * (b - 1) // 2 + layer.out_features for layer in layers)
    config = bv.BOFTConfig(block_size=b, n_butterfly_factor=m, target_modules=SAM["decoder_attention"])
    assert count(sam_mask_decoder, config)[1] == expected == {4: 44_416, 8: 50_944}[b]
