"""Text-classification data: GLUE tasks (through ``datasets`` when online) or local CSV/JSONL files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# task → (text columns, number of labels; 1 = regression)
GLUE_TASKS = {
    "cola": (("sentence",), 2), "sst2": (("sentence",), 2), "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2), "stsb": (("sentence1", "sentence2"), 1),
    "mnli": (("premise", "hypothesis"), 3), "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2), "wnli": (("sentence1", "sentence2"), 2),
}
GLUE_MAIN_METRIC = {"cola": "matthews", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .csv (header line) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    if path.suffix == ".jsonl":
        rows, bad = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    bad.append(f"line {n} ({err.msg})")
        if bad:
            raise ValueError(f"{path}: {len(bad)} line(s) are not JSON: {'; '.join(bad[:10])}; fix or remove them")
    elif path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: use a .csv, .tsv or .jsonl file")
    if not rows:
        raise ValueError(f"{path} has no rows (a header alone is not data)")
    return rows


def text_examples(rows: list[dict], text_columns, label_column: str, regression: bool, source: str):
    """(texts tuple, label) pairs, with clear errors for missing columns or unparsable labels."""
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in (*text_columns, label_column) if c not in row]
        if missing:
            raise KeyError(f"{source} row {i}: missing column(s) {missing}; it has {sorted(row)}")
        try:
            label = float(row[label_column]) if regression else int(row[label_column])
        except ValueError as err:
            raise ValueError(f"{source} row {i}: label {row[label_column]!r} is not a number") from err
        out.append((tuple(str(row[c]) for c in text_columns), label))
    return out


def load_glue(task: str, split: str):
    """A GLUE split from the Hub (needs ``datasets`` and network); rows as dicts."""
    from datasets import load_dataset

    return list(load_dataset("glue", task, split=split))
