"""The accuracy–time frontier of one benchmark run: mean Dice against mean registration time.

One point per method (and preset) of ``benchmarks/results/real_summary.csv``, all
from the same run of ``bench_real.py``; the methods on the Pareto frontier (no
other method is both faster and more accurate) are joined by a line.

Usage::

    python benchmarks/plot_frontier.py [--summary benchmarks/results/real_summary.csv]

Writes ``benchmarks/results/figures/frontier.png``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

LABELS = {"opt": "avsm opt (fast)", "opt-paper": "avsm opt (paper)", "net": "avsm net",
          "net+opt": "avsm net+opt (default here)", "ants-syn": "ANTs SyN", "demons": "SimpleITK demons",
          "niftyreg": "NiftyReg", "elastix": "elastix", "voxelmorph": "VoxelMorph"}
#: label offsets (points) so that neighbouring labels do not overlap
OFFSETS = {"ants-syn": (-10, 8), "niftyreg": (6, -12), "opt": (6, -12), "net+opt": (6, 4), "elastix": (6, 4),
           "opt-paper": (-70, -14)}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (time, dice, name) not dominated by a faster-and-more-accurate one, by time."""
    out = []
    best = -1.0
    for t, d, n in sorted(points):
        if d > best:
            out.append((t, d, n))
            best = d
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", default=os.path.join(HERE, "results", "real_summary.csv"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "figures", "frontier.png"))
    args = ap.parse_args(argv)
    rows = [r for r in csv.DictReader(open(args.summary)) if r["method"] != "identity"]
    pts = [(float(r["time_mean"]), float(r["dice_mean"]), r["method"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for t, d, n in pts:
        own = n.startswith("opt") or n.startswith("net")
        ax.scatter(t, d, s=60, marker="o" if own else "s", color="tab:red" if own else "tab:blue", zorder=3)
        ax.annotate(LABELS.get(n, n), (t, d), textcoords="offset points", xytext=OFFSETS.get(n, (6, -3)),
                    fontsize=8)
    front = pareto(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", lw=1, zorder=2,
            label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("mean registration time per pair (s, log scale; 2-core CPU, 2 threads)")
    ax.set_ylabel("mean Dice, 12 subcortical structures")
    ax.set_title("Colin27 ↔ MNI 2009c, 4 pairs, one run of bench_real.py")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    sys.stdout.write(f"wrote {args.out}; frontier: {', '.join(p[2] for p in front)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
