"""LoRA, VB-LoRA, OFT and BOFT as DreamBooth adapters of the embedded tiny pipeline, in one table:
subject fidelity and prompt preservation (pixel-measured, see train_scripts/eval_dreambooth.py),
trainable / stored parameters and training seconds, with and without prior preservation.

    python benchmarks/compare_dreambooth.py --output_dir outputs/compare     # = make compare

Every run is the main job's task (`make demo`): the bundled subject, UNet attention (``--unet_targets``;
the main job adapts the feed-forward layers too, ``attention_ff``) + text encoder q/v, 400 steps,
batch 1, seed 0, 20 class images. Each method is first swept over its learning rates
(``RATES``, or ``--learning_rates`` for all) with prior preservation; the rate with the best mean of
subject fidelity and prompt preservation is kept and also trained without prior preservation. Runs
already in ``--output_dir`` are reused (a killed comparison resumes). Writes compare.md and compare.json
there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import eval_dreambooth  # noqa: E402
import train_dreambooth_boft  # noqa: E402

from boftvision.files import write_text_atomic  # noqa: E402
from boftvision.integrations.diffusers import UNET_PRESETS  # noqa: E402

# sizes that divide the tiny pipeline's widths (UNet 32/64, text encoder 32)
ADAPTERS = {
    "LoRA r=4": ["--adapter", "lora", "--lora_r", "4", "--lora_alpha", "4"],
    "VB-LoRA r=4 bank 64×8": ["--adapter", "vblora", "--vblora_r", "4", "--vblora_num_vectors", "64",
                               "--vblora_vector_length", "8"],
    "OFT b=8": ["--adapter", "oft", "--oft_block_size", "8"],
    "BOFT m=2 b=8": ["--adapter", "boft", "--boft_block_size", "8", "--boft_n_butterfly_factor", "2"],
    "BOFT m=4 b=4": ["--adapter", "boft", "--boft_block_size", "4", "--boft_n_butterfly_factor", "4"],
}
# each method's sweep: Adam moves every entry of OFT/BOFT's skew blocks by ~lr per step, a rotation of the
# whole weight, so their useful rates sit lower than the additive methods'
ADDITIVE_RATES, ORTHOGONAL_RATES = (5e-4, 1e-3, 2e-3, 5e-3), (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)
RATES = {name: ORTHOGONAL_RATES if "OFT" in name else ADDITIVE_RATES for name in ADAPTERS}
RATES["VB-LoRA r=4 bank 64×8"] = (5e-4, 1e-3, 2e-3)  # best inside: 1e-3 beats both neighbours by far
SUBJECT = ROOT / "boftvision" / "assets" / "sks-instance"


def train_and_score(out: Path, adapter_flags: list[str], lr: float, prior: bool, class_dir: Path, args,
                    compare_base: bool = False) -> dict:
    """One DreamBooth run and its scores (both reused when ``out`` already holds them); ``compare_base``
    scores the base model too (same prompts and seeds)."""
    scores_file = out / "eval" / "results.json"
    if not (out / "results.json").is_file():  # results.json is written last: the run is complete
        flags = ["--instance_data_dir", str(SUBJECT), "--instance_prompt", "a photo of sks shape",
                 "--train_text_encoder", "--unet_targets", args.unet_targets, "--learning_rate", str(lr),
                 "--max_train_steps", str(args.max_train_steps), "--seed", "0", "--output_dir", str(out),
                 "--overwrite_output_dir", *adapter_flags]
        if prior:
            flags += ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt",
                      "a photo of a shape", "--num_class_images", "20"]
        train_dreambooth_boft.main(flags)
    if not scores_file.is_file():
        eval_dreambooth.main(["--adapter_path", str(out), "--num_seeds", str(args.num_seeds), "--guidance_scale",
                              "4", "--output_dir", str(out / "eval"), *(["--compare_base"] if compare_base else [])])
    run = json.loads((out / "results.json").read_text())
    scores = json.loads(scores_file.read_text())["results"]["adapter"]
    return {"lr": lr, "prior_preservation": prior,
            "subject_fidelity": scores["subject fidelity"]["mean"],
            "prompt_preservation": scores["prompt preservation"]["mean"],
            "trainable": run["trainable_parameters"], "stored": run["stored_parameters"],
            "seconds": round(run["seconds"], 1)}


def saved_base(out: Path) -> dict | None:
    """The base model's scores, from whichever run in ``out`` was scored with --compare_base (the first)."""
    for scores in sorted(out.glob("*/eval/results.json")):
        base = json.loads(scores.read_text())["results"].get("base")
        if base is not None:
            return base
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/compare")
    p.add_argument("--learning_rates", help="the sweep for every method, comma-separated (default: each "
                   "method's own, RATES)")
    p.add_argument("--adapters", default=",".join(ADAPTERS), help="which rows (names as in the table)")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--num_seeds", type=int, default=16)
    p.add_argument("--unet_targets", choices=list(UNET_PRESETS), default="attention",
                   help="UNet layers every run adapts (attention_ff is the main job's)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    given = [float(x) for x in args.learning_rates.split(",")] if args.learning_rates else None
    names = [n.strip() for n in args.adapters.split(",")]
    unknown = set(names) - set(ADAPTERS)
    if unknown:
        p.error(f"--adapters: unknown {sorted(unknown)}; choose from {list(ADAPTERS)}")
    class_dir = out / "class-images"
    rows, sweeps = [], {}
    for name in names:
        slug = name.split(" bank")[0].replace(" ", "-").replace("=", "").lower()
        sweep = [train_and_score(out / f"{slug}-lr{lr:g}", ADAPTERS[name], lr, True, class_dir, args,
                                 compare_base=saved_base(out) is None) for lr in given or RATES[name]]
        sweeps[name] = sweep
        best = max(sweep, key=lambda r: r["subject_fidelity"] + r["prompt_preservation"])
        rows.append({"adapter": name, **best})
        rows.append({"adapter": name, **train_and_score(out / f"{slug}-lr{best['lr']:g}-no-prior", ADAPTERS[name],
                                                          best["lr"], False, class_dir, args)})
    base = saved_base(out)
    lines = ["| adapter | prior preservation | lr | subject fidelity | prompt preservation | trainable | stored "
             "| training s |", "|---|---|---|---|---|---|---|---|",
             f"| base model | – | – | {base['subject fidelity']['mean']:.2f} | "
             f"{base['prompt preservation']['mean']:.2f} | – | – | – |"]
    for r in rows:
        lines.append(f"| {r['adapter']} | {'yes' if r['prior_preservation'] else 'no'} | {r['lr']:g} | "
                     f"{r['subject_fidelity']:.2f} | {r['prompt_preservation']:.2f} | {r['trainable']:,} | "
                     f"{r['stored']:,} | {r['seconds']:.0f} |")
    rates = sorted({r["lr"] for sweep in sweeps.values() for r in sweep})
    sweep_lines = ["| adapter | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name, sweep in sweeps.items():
        by_rate = {r["lr"]: f"{r['subject_fidelity']:.2f} / {r['prompt_preservation']:.2f}" for r in sweep}
        sweep_lines.append(f"| {name} | " + " | ".join(by_rate.get(lr, "–") for lr in rates) + " |")
    text = "\n".join(lines) + "\n\nSweep (with prior preservation; subject fidelity / prompt preservation):\n\n" + \
        "\n".join(sweep_lines) + "\n"
    write_text_atomic(out / "compare.md", text)
    write_text_atomic(out / "compare.json", json.dumps({"rows": rows, "sweeps": sweeps, "base": base}, indent=1))
    print(text, end="")
    return {"rows": rows, "sweeps": sweeps}


if __name__ == "__main__":
    main()
