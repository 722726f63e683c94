"""Scale benchmark: wall time and peak memory against image size, for each method.

The MNI 2009c brain and a synthetic warped copy (see ``bench_synthetic.py``)
are resampled to each size (same physical box, so the spacing changes) and
each method runs on that grid as it is (no further resampling: avsm gets
``shape=size``, the baselines ``spacing=None``).  Each registration runs in a
fresh subprocess (peak RSS by ``getrusage``).

Usage::

    PYTHONPATH=src python benchmarks/bench_scale.py --sizes 64x64x64,96x96x96,128x128x128,80x192x192,256x256x256 \
        --methods opt,ants-syn,demons

Sizes are ``DxHxW`` in tensor order (S-I × A-P × L-R after canonical
re-orientation); ``80x192x192`` is the paper's knee-MRI size order of magnitude.
Writes ``benchmarks/results/scale/`` and ``benchmarks/results/scale_results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from _synth import random_svf_transform, resample_to, warp_sitk  # noqa: E402

from avsm.eval.pairs import Pair  # noqa: E402
from avsm.eval.runner import EvalConfig, evaluate  # noqa: E402
from avsm.io.geometry import Grid  # noqa: E402

log = logging.getLogger("bench_scale")


def make_pair(data_dir: str, work: str, shape: tuple[int, int, int], seed: int) -> Pair:
    """Fixed = MNI 2009c on a grid of ``shape`` (canonical axes), moving = a synthetic warp of it."""
    os.makedirs(work, exist_ok=True)
    tag = "x".join(map(str, shape))
    fp, mp = os.path.join(work, f"fixed_{tag}.nii.gz"), os.path.join(work, f"moving_{tag}.nii.gz")
    if not (os.path.exists(fp) and os.path.exists(mp)):
        img = sitk.Cast(sitk.ReadImage(os.path.join(data_dir, "mni2009c_brain.nii.gz")), sitk.sitkFloat32)
        grid = Grid.from_sitk(img).canonical().resized(shape)
        f = resample_to(img, grid, False)
        sitk.WriteImage(f, fp)
        sitk.WriteImage(warp_sitk(f, grid, random_svf_transform(grid, np.random.default_rng(seed)), False), mp)
    return Pair(tag, mp, fp)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--sizes", default="64x64x64,96x96x96,128x128x128,80x192x192,256x256x256")
    ap.add_argument("--methods", default="opt,ants-syn,demons")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = os.path.join(args.out, "scale")
    methods = args.methods.split(",")
    table = []
    for s in args.sizes.split(","):
        shape = tuple(int(v) for v in s.lower().split("x"))
        pair = make_pair(args.data_dir, os.path.join(work, "inputs"), shape, args.seed)  # type: ignore[arg-type]
        opts = {m: ({"shape": list(shape)} if m in ("affine", "opt", "net", "net+opt") else {"spacing": None})
                for m in methods}
        cfg = EvalConfig(methods=methods, out_dir=os.path.join(work, pair.pair_id), consistency=False,
                         hd95=False, spacing=None, method_opts=opts, isolate=True)
        rows = evaluate([pair], cfg, rank=0, world=1, progress=False) or []
        for r in rows:
            table.append({"size": pair.pair_id, "voxels": int(np.prod(shape)), "method": r["method"],
                          "status": r["status"], "time_s": r.get("time_s"), "peak_rss_mb": r.get("peak_rss_mb"),
                          "folds": r.get("folds"), "error": r.get("error")})
    out_csv = os.path.join(args.out, "scale_results.csv")
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]) if table else ["size"])
        w.writeheader()
        w.writerows(table)
    lines = ["| size | method | time (s) | peak RSS (MB) | folds | status |", "|---|---|---|---|---|---|"]
    for t in table:
        ts = f"{t['time_s']:.1f}" if isinstance(t["time_s"], float) else "–"
        mem = f"{t['peak_rss_mb']:.0f}" if isinstance(t["peak_rss_mb"], float) else "–"
        lines.append(f"| {t['size']} | {t['method']} | {ts} | {mem} | {t['folds']} | {t['status']} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "scale_summary.md"), "w") as fh:
        fh.write(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
