"""BOFT paper, Fig. 5: how well can BOFT(m, b) approximate a random orthogonal matrix?

For each seed, draw Q uniformly from SO(d) (d = 512); for each (m, b) fit R(m, b) = B_{m−1} ⋯ B_0
(Cayley blocks, our ops) by Adam on ‖R − Q‖²_F / d and report the final error against the effective
parameter count m·(d/b)·b(b−1)/2. m = 1 is OFT(b). Writes docs/expressiveness.md and a PNG plot.

    python benchmarks/boft_expressiveness.py [--seeds 10] [--steps 600]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from boftvision.ops.orthogonal import butterfly_apply, cayley, check_butterfly_shape, skew_from_square

CONFIGS = [(1, 2), (1, 4), (1, 8), (1, 16), (1, 32), (1, 64),
           (2, 8), (2, 16), (3, 8), (4, 4), (6, 4), (5, 2), (7, 2), (9, 2)]


def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar on O(d)
    if torch.det(q) < 0:  # Cayley products have det +1: target SO(d)
        q[:, 0] = -q[:, 0]
    return q.float()


def fit(q: torch.Tensor, m: int, b: int, steps: int, lr: float) -> float:
    d = q.shape[0]
    params = torch.zeros(m, d // b, b, b, requires_grad=True)
    optim = torch.optim.Adam([params], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
    eye = torch.eye(d)
    for _ in range(steps):
        optim.zero_grad(set_to_none=True)
        r = butterfly_apply(eye, cayley(skew_from_square(params)))
        loss = (r - q).square().sum() / d
        loss.backward()
        optim.step()
        sched.step()
    with torch.no_grad():
        return ((butterfly_apply(eye, cayley(skew_from_square(params))) - q).square().sum() / d).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()

    configs = [(m, b) for m, b in CONFIGS if check_butterfly_shape(args.dim, b, m) is None]
    errors: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for seed in tqdm(range(args.seeds), desc="seeds"):
        q = random_rotation(args.dim, torch.Generator().manual_seed(seed))
        for m, b in configs:
            errors[(m, b)].append(fit(q, m, b, args.steps, args.lr))

    def params(m, b):
        return m * (args.dim // b) * b * (b - 1) // 2

    lines = [
        "# Expressiveness: approximating a random orthogonal matrix (BOFT paper, Fig. 5)", "",
        f"Target: Q uniform on SO({args.dim}); fit R(m, b) by Adam (lr {args.lr}, cosine, {args.steps} steps) on "
        f"‖R − Q‖²_F / d; {args.seeds} seeds (mean ± std). The identity's error is 2·(1 − tr(Q)/d) ≈ 2.",
        "", f"Command: `python benchmarks/boft_expressiveness.py --seeds {args.seeds} --steps {args.steps}`", "",
        "| method | m | b | effective params | error (mean ± std) |", "|---|---|---|---|---|",
    ]
    rows = sorted(configs, key=lambda c: params(*c))
    for m, b in rows:
        e = errors[(m, b)]
        std = statistics.stdev(e) if len(e) > 1 else 0.0
        name = f"OFT(b={b})" if m == 1 else f"BOFT({m},{b})"
        lines.append(f"| {name} | {m} | {b} | {params(m, b):,} | {statistics.mean(e):.4f} ± {std:.4f} |")
    lines += ["", "The paper's comparisons (Fig. 5):"]
    for a, b in (((9, 2), (1, 16)), ((6, 4), (2, 16))):
        if a in errors and b in errors:
            ea, eb = statistics.mean(errors[a]), statistics.mean(errors[b])
            lines.append(f"- BOFT{a} vs {'OFT(b=%d)' % b[1] if b[0] == 1 else 'BOFT%s' % (b,)}: error {ea:.4f} vs "
                         f"{eb:.4f} with {params(*a):,} vs {params(*b):,} parameters")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expressiveness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, keep in (("OFT (m=1)", lambda m: m == 1), ("BOFT (m>1)", lambda m: m > 1)):
        pts = [(params(m, b), statistics.mean(errors[(m, b)]), f"({m},{b})") for m, b in configs if keep(m)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" if keep(1) else "s", label=label)
        for x, y, t in pts:
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("effective trainable parameters")
    ax.set_ylabel("‖R − Q‖²_F / d")
    ax.set_title(f"Approximating a random {args.dim}×{args.dim} rotation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "expressiveness.png", dpi=120)


if __name__ == "__main__":
    main()
