"""Choose vSVF-opt/affine-opt schedules on *development* pairs (not the benchmark pairs).

The fast preset of ``--method opt`` is chosen here, on real cross-subject
pairs that ``benchmarks/bench_real.py`` does not use: Mindboggle OASIS-TRT-20
subjects (skull-stripped T1, manual labels; the data README allows them for
validation and model selection), registered in the same space as they come
(no affine perturbation) and with a known random affine on the moving image.
Dice is the mean over all labels present in both maps, with labels warped by
nearest neighbour on the fixed image's own 1 mm grid (enough to rank schedules).

Each variant runs in-process, one after another (never two at once: on 2
cores parallel torch jobs slow each other 10-20x).  Prints a table of Dice,
time per stage and energy evaluations per level, and writes
``benchmarks/results/opt_schedules.jsonl``.

Usage::

    PYTHONPATH=src python benchmarks/bench_opt_schedules.py --data-dir ../shared/data \
        --variants paper,fast --pairs 01-02,03-04
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from avsm.api import register  # noqa: E402
from avsm.io.image import Volume, load_image  # noqa: E402
from avsm.metrics.overlap import dice_per_label  # noqa: E402
from avsm.optim.affine_opt import AffineOptConfig  # noqa: E402
from avsm.optim.vsvf_opt import VSVFOptConfig  # noqa: E402
from avsm.settings import preset  # noqa: E402

log = logging.getLogger("bench_opt_schedules")


def variants() -> dict[str, tuple[AffineOptConfig, VSVFOptConfig]]:
    """Named (affine, vSVF) settings compared here."""
    paper = preset("paper")
    fast = preset("fast")
    out = {"paper": (paper.affine, paper.vsvf), "fast": (fast.affine, fast.vsvf)}
    short_aff = AffineOptConfig(scales=(0.25, 0.5, 1.0), iterations=(100, 50, 10))
    fast_aff = fast.affine
    rk = dict(integrator="rk4")
    ss = dict(integrator="ss")
    out["short-lbfgs-rk4"] = (short_aff, VSVFOptConfig(iterations=(40, 20, 0), **rk))
    out["short-lbfgs-ss"] = (short_aff, VSVFOptConfig(iterations=(40, 20, 0), **ss))
    out["fa-lbfgs-ss-40-20-0"] = (fast_aff, VSVFOptConfig(iterations=(40, 20, 0), **ss))
    out["fa-lbfgs-ss-40-20-0-tol"] = (fast_aff, VSVFOptConfig(iterations=(40, 20, 0), tol=1e-3, **ss))
    out["fa-nols-ss-60-40-0"] = (fast_aff, VSVFOptConfig(iterations=(60, 40, 0), optimizer="lbfgs-nols",
                                                         lr=0.5, **ss))
    for lr in (0.02, 0.05, 0.1):
        out[f"fa-adam{lr}-ss-80-40-0"] = (fast_aff, VSVFOptConfig(iterations=(80, 40, 0), optimizer="adam",
                                                                  lr=lr, **ss))
    out["fa-lbfgs-ss-40-20-5"] = (fast_aff, VSVFOptConfig(iterations=(40, 20, 5), **ss))
    return out


def random_affine_volume(vol: Volume, seed: int) -> tuple[Volume, np.ndarray]:
    """``vol`` resampled through a seeded random affine about its centre (as bench_real does)."""
    import SimpleITK as sitk

    from bench_real import apply_affine, random_affine  # type: ignore[import-not-found]

    img = vol.to_sitk()
    size = np.array(img.GetSize())
    corner = np.array(img.TransformContinuousIndexToPhysicalPoint([float(s - 1) for s in size]))
    origin = np.array(img.GetOrigin())
    M = random_affine(np.random.default_rng(seed), np.abs(corner - origin))
    out = apply_affine(img, M, 0.5 * (corner + origin), vol.is_label)
    _ = sitk
    return Volume.from_sitk(out, path=vol.path, is_label=vol.is_label), M


def dice_mean(result, moving_labels: Volume, fixed_labels: Volume) -> float:
    """Mean Dice over labels present in both maps (nearest-neighbour warp on the fixed grid)."""
    w = result.warp(moving_labels, mode="nearest")
    shared = sorted((set(np.unique(fixed_labels.array)) & set(np.unique(moving_labels.array))) - {0})
    d = dice_per_label(w.array, fixed_labels.array, labels=shared)
    return float(np.nanmean(list(d.values())))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--variants", default="paper,fast")
    ap.add_argument("--pairs", default="01-02,03-04", help="OASIS-TRT-20 moving-fixed subject pairs")
    ap.add_argument("--affine-seeds", default="7", help="seeds of random affines applied to the moving image")
    ap.add_argument("--extra", default=None,
                    help='JSON {name: {"affine": {...}, "vsvf": {...}}} of variants over the fast preset')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "opt_schedules.jsonl"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    table = variants()
    if args.extra:
        base = preset("fast")
        for k, v in json.loads(args.extra).items():
            table[k] = (dataclasses.replace(base.affine, **v.get("affine", {})),
                        dataclasses.replace(base.vsvf, **v.get("vsvf", {})))
        if args.variants == "paper,fast":
            args.variants = ",".join(json.loads(args.extra))
    names = [v for v in args.variants.split(",") if v]
    for n in names:
        if n not in table and n != "ants-syn":
            raise SystemExit(f"unknown variant {n}; known: {', '.join(table)}")
    d = os.path.join(os.path.abspath(args.data_dir), "oasis-trt20")
    cases = []
    for p in args.pairs.split(","):
        a, b = p.split("-")
        mv, ml = load_image(f"{d}/trt{a}.nii.gz"), load_image(f"{d}/trt{a}_labels.nii.gz", label=True)
        fv, fl = load_image(f"{d}/trt{b}.nii.gz"), load_image(f"{d}/trt{b}_labels.nii.gz", label=True)
        cases.append((f"{a}->{b}", fv, mv, fl, ml))
        for s in [int(x) for x in args.affine_seeds.split(",") if x]:
            mva, _ = random_affine_volume(mv, s)
            mla, _ = random_affine_volume(ml, s)
            cases.append((f"{a}A{s}->{b}", fv, mva, fl, mla))
    rows = []
    with open(args.out, "a") as fh:
        for name in names:
            for cid, fv, mv, fl, ml in cases:
                t0 = time.perf_counter()
                if name == "ants-syn":
                    from avsm.baselines.ants import ants_syn, warmup

                    warmup()
                    t0 = time.perf_counter()
                    res = ants_syn(fv, mv)
                else:
                    aff, vs = table[name]
                    res = register(fixed=fv, moving=mv, method="opt", affine_config=dataclasses.replace(aff),
                                   vsvf_config=dataclasses.replace(vs), progress=False)
                t = time.perf_counter() - t0
                dm = dice_mean(res, ml, fl)
                da = dice_mean(_AffineOnly(res), ml, fl)
                row = {"variant": name, "pair": cid, "dice": round(dm, 4), "dice_affine": round(da, 4),
                       "time_s": round(t, 2), "timings": {k: round(v, 2) for k, v in res.timings.items()},
                       "evaluations": res.info.get("vsvf_evaluations"), "folds": res.folds(),
                       "threads": torch.get_num_threads()}
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                log.info("%s", json.dumps(row))
    sys.stdout.write("\n| variant | pair | Dice | Dice affine | time s | affine s | vsvf s | evals | folds |\n"
                     "|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        sys.stdout.write(f"| {r['variant']} | {r['pair']} | {r['dice']:.4f} | {r['dice_affine']:.4f} | "
                         f"{r['time_s']:.1f} | {r['timings'].get('affine', 0):.1f} | "
                         f"{r['timings'].get('vsvf', 0):.1f} | {r['evaluations']} | {r['folds']} |\n")
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        sys.stdout.write(f"mean {name}: Dice {np.mean([r['dice'] for r in rs]):.4f}, "
                         f"time {np.mean([r['time_s'] for r in rs]):.1f} s\n")
    return 0


class _AffineOnly:
    """A view of a result that warps with its affine stage only."""

    def __init__(self, res) -> None:
        self.res = res

    def warp(self, volume: Volume, mode: str | None = None) -> Volume:
        return self.res.warp(volume, mode=mode, affine_only=True)


if __name__ == "__main__":
    sys.exit(main())
