#!/usr/bin/env python
"""Training curves (loss and validation Dice per epoch) from ``metrics.jsonl`` files.

Usage::

    PYTHONPATH=src python benchmarks/plot_training.py --run runs/pretrained \
        --out benchmarks/results/figures/training_curves.png

Reads ``RUN/affine/metrics.jsonl``, ``RUN/vsvf/metrics.jsonl`` (``avsm train``) and,
when present, ``RUN/voxelmorph/metrics.jsonl`` (``scripts/train_voxelmorph.sh``);
copies the epoch records to ``benchmarks/results/training/*.jsonl`` next to the figure's folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _epochs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in recs if r.get("kind", "epoch") == "epoch" and "val_dice" in r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    run = Path(a.run)
    series = {"affine": _epochs(run / "affine" / "metrics.jsonl"),
              "vsvf": _epochs(run / "vsvf" / "metrics.jsonl"),
              "voxelmorph": _epochs(run / "voxelmorph" / "metrics.jsonl")}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = out.parent.parent / "training"
    keep.mkdir(parents=True, exist_ok=True)
    for name, recs in series.items():
        if recs:
            (keep / f"{name}_epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, recs in series.items():
        if not recs:
            continue
        ep = [r["epoch"] for r in recs]
        loss = [r.get("train_total", r.get("train_loss")) for r in recs]
        axes[0].plot(ep, loss, label=f"{name} training loss")
        axes[1].plot(ep, [r["val_dice"] for r in recs], marker=".", label=f"{name} validation Dice")
        if "val_dice_identity" in recs[0]:
            axes[1].axhline(recs[0]["val_dice_identity"], ls=":", color="grey")
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training loss (VoxelMorph: −NCC + λ‖∇v‖²)")
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation Dice, synthetic pairs (dotted: unregistered)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
