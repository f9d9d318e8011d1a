"""Evaluate a saved VTAB run (adapter/ + head.safetensors) on a task's split; prints top-1.

    python train_scripts/eval_vtab.py --pretrained_model_name_or_path facebook/dinov2-large \
        --adapter_path outputs/vtab/cifar/seed0 --data_root /data/vtab-1k
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file
from torch.utils.data import DataLoader

import boftvision as bv
from boftvision.data.vtab import VTABDataset
from boftvision.integrations.dinov2 import Dinov2Classifier, load_backbone
from boftvision.metrics.classification import top1_accuracy
from boftvision.training import RENAMED, describe_flags, run_cli


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", "--model_name_or_path", action=RENAMED,
                   dest="model_name_or_path", default=None, help="the backbone (default: the one the run recorded)")
    p.add_argument("--backbone_source", choices=["transformers", "timm"], default=None,
                   help="transformers or timm (default: the run's)")
    p.add_argument("--timm_checkpoint", default=None)
    p.add_argument("--timm_kwargs", type=json.loads, default=None,
                   help='JSON of timm.create_model overrides for the backbone, e.g. \'{"drop_path_rate": 0.1}\'')
    p.add_argument("--adapter_path", "--run_dir", dest="run_dir", action=RENAMED,
                   required=True, help="a train_vtab_boft.py run folder (<output_dir>/<task>/seed<N>)")
    p.add_argument("--data_root", required=True)
    p.add_argument("--allow_paths_outside_data_dir", action="store_true",
                   help="let the dataset's listing name files outside its folder (absolute or ../ paths)")
    p.add_argument("--task", default=None, help="default: the task in run_dir/result.json")
    p.add_argument("--split", default="test", help="split file to evaluate")
    p.add_argument("--num_classes", type=int, default=None,
                   help="classes of a task outside the 19 (default: read from the run)")
    p.add_argument("--image_size", type=int, default=None, help="input resolution (default: the run's)")
    p.add_argument("--eval_batch_size", "--batch_size", dest="batch_size", action=RENAMED, type=int, default=128)
    args = describe_flags(p).parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "result.json").is_file():
        p.error(f"--adapter_path {run_dir}: no result.json; give a train_vtab_boft.py run folder "
                "(<output_dir>/<task>/seed<N>)")
    recorded = json.loads((run_dir / "result.json").read_text())
    for key, value in {**recorded.get("backbone", {}), "image_size": recorded.get("image_size"),
                       "num_classes": recorded.get("num_classes")}.items():
        if getattr(args, key) is None:  # what the run recorded, unless given
            setattr(args, key, value)
    args.model_name_or_path = args.model_name_or_path or "facebook/dinov2-large"
    args.backbone_source, args.image_size = args.backbone_source or "transformers", args.image_size or 224
    task = args.task or recorded["task"]

    dataset = VTABDataset(args.data_root, task, args.split, args.image_size, args.num_classes,
                          allow_outside=args.allow_paths_outside_data_dir)
    head = load_file(str(run_dir / "head.safetensors"))
    model = Dinov2Classifier(load_backbone(args.model_name_or_path, args.backbone_source, args.timm_checkpoint,
                                           args.image_size, args.timm_kwargs),
                             head["weight"].shape[0])
    model.head.load_state_dict(head)
    bv.load_adapter(model.backbone, run_dir / "adapter", is_trainable=False)
    accuracy = top1_accuracy(model, DataLoader(dataset, args.batch_size))
    print(json.dumps({"task": task, "split": args.split, "top1": accuracy}))
    return accuracy


if __name__ == "__main__":
    run_cli(main)
