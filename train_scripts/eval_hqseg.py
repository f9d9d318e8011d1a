"""Evaluate SAM (optionally with a decoder adapter) on HQSeg-44K's evaluation sets with box prompts.

    python train_scripts/eval_hqseg.py --data_root data --model_type vit_h \
        --checkpoint sam_vit_h_4b8939.pth --adapter_path outputs/hqseg/adapter
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import boftvision as bv
from boftvision.data.hqseg import EVAL_SETS, HQSegDataset
from boftvision.integrations.sam import build_sam, embedding_cache, evaluate_sets, load_sam, scores_table
from boftvision.training import RENAMED, describe_flags, run_cli


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True)
    p.add_argument("--eval_sets", nargs="+", default=list(EVAL_SETS), help="evaluation sets")
    p.add_argument("--model_type", default="vit_h", help="SAM size: vit_b, vit_l or vit_h")
    p.add_argument("--checkpoint", default=None, help="SAM checkpoint (.pth)")
    p.add_argument("--sam_config", default=None, help="a JSON SAM config (tiny test models) instead of --model_type")
    p.add_argument("--adapter_path", "--adapter_dir", dest="adapter_dir", action=RENAMED,
                   default=None, help="omit to evaluate the frozen decoder")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = describe_flags(p).parse_args(argv)
    if args.sam_config:
        sam = build_sam(json.loads(Path(args.sam_config).read_text()), args.checkpoint)
    else:
        sam = load_sam(args.model_type, args.checkpoint)
    sam = sam.to(args.device)
    if args.adapter_dir:
        bv.load_adapter(sam.mask_decoder, args.adapter_dir, is_trainable=False)
    datasets = {name: HQSegDataset.from_sets(args.data_root, [name]) for name in args.eval_sets}
    scores = evaluate_sets(sam, datasets, embedding_cache(args.cache_dir, args.model_type, args.checkpoint,
                                                          args.sam_config))
    print(scores_table(scores))
    return scores


if __name__ == "__main__":
    run_cli(main)
