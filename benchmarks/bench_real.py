"""Real cross-subject benchmark: Colin27 (AAL) ↔ MNI ICBM 2009c (aseg), 12 shared structures.

Four pairs, every method, all metrics from one run of the evaluation harness
(:mod:`avsm.eval`):

* ``mni<-colin`` and ``colin<-mni``: the images as they are (both directions);
* ``mni<-colinA`` and ``colinA<-mni``: Colin27 (image and labels) resampled
  through a known random affine (seeded; rotation ≤ 15° about a random axis,
  scale 0.9–1.1 per axis, translation ≤ 10 % of the extent per axis), so the
  affine stage has something to do.

Each pair is registered in both directions anyway, so the inverse-consistency
measure costs nothing extra.  Dice/HD95 are measured on the fixed image's own
1 mm grid over the 12 structures (see ``../shared/data/README.md``); methods
work on ≈2 mm grids.

Usage::

    PYTHONPATH=src python benchmarks/bench_real.py --data-dir ../shared/data \
        --methods identity,opt,ants-syn,demons --syncc-pairs 2

Writes ``benchmarks/results/real/`` (rows, results.csv, summary.*) and copies
``results.csv`` / ``summary.md`` to ``benchmarks/results/real_*.{csv,md}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from avsm.eval.pairs import Pair, write_pairs  # noqa: E402
from avsm.eval.runner import EvalConfig, evaluate, merge  # noqa: E402

log = logging.getLogger("bench_real")

#: (name, AAL value in colin27_aal, aseg value in mni2009c_dkt)
STRUCTURES = [
    ("thalamus_L", 77, 10), ("thalamus_R", 78, 49), ("caudate_L", 71, 11), ("caudate_R", 72, 50),
    ("putamen_L", 73, 12), ("putamen_R", 74, 51), ("pallidum_L", 75, 13), ("pallidum_R", 76, 52),
    ("hippocampus_L", 37, 17), ("hippocampus_R", 38, 53), ("amygdala_L", 41, 18), ("amygdala_R", 42, 54),
]


def random_affine(rng: np.random.Generator, extent_mm: np.ndarray, max_rot_deg: float = 15.0,
                  scale: tuple[float, float] = (0.9, 1.1), max_trans: float = 0.10) -> np.ndarray:
    """A random world affine ``(4, 4)`` about the origin (rotation about a random axis, scales, translation)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    S = np.diag(rng.uniform(*scale, size=3))
    t = rng.uniform(-max_trans, max_trans, size=3) * extent_mm
    M = np.eye(4)
    M[:3, :3] = R @ S
    M[:3, 3] = t
    return M


def apply_affine(img: sitk.Image, M: np.ndarray, centre: np.ndarray, label: bool) -> sitk.Image:
    """Resample ``img`` on its own grid through ``x -> M (x - c) + c`` (pull-back)."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for v in M[:3, :3].reshape(-1)])
    tx.SetTranslation([float(v) for v in M[:3, 3]])
    tx.SetCenter([float(v) for v in centre])
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(img, img, tx, interp, 0.0, img.GetPixelID())


def prepare(data_dir: str, work: str, seed: int) -> list[Pair]:
    """Write the perturbed Colin27, the label mappings and return the 4 pairs."""
    os.makedirs(work, exist_ok=True)
    d = os.path.abspath(data_dir)
    colin, colin_l = os.path.join(d, "colin27_brain.nii.gz"), os.path.join(d, "colin27_aal.nii.gz")
    mni, mni_l = os.path.join(d, "mni2009c_brain.nii.gz"), os.path.join(d, "mni2009c_dkt.nii.gz")
    for p in (colin, colin_l, mni, mni_l):
        if not os.path.exists(p):
            raise SystemExit(f"missing {p}")
    map_fwd = os.path.join(work, "aseg_to_aal.csv")  # fixed = MNI (aseg), moving = Colin (AAL)
    map_rev = os.path.join(work, "aal_to_aseg.csv")
    with open(map_fwd, "w") as fh:
        fh.write("aseg,aal,name\n" + "".join(f"{s},{a},{n}\n" for n, a, s in STRUCTURES))
    with open(map_rev, "w") as fh:
        fh.write("aal,aseg,name\n" + "".join(f"{a},{s},{n}\n" for n, a, s in STRUCTURES))
    colin_a = os.path.join(work, f"colin27_brain_affine_seed{seed}.nii.gz")
    colin_al = os.path.join(work, f"colin27_aal_affine_seed{seed}.nii.gz")
    if not (os.path.exists(colin_a) and os.path.exists(colin_al)):
        img = sitk.ReadImage(colin)
        lab = sitk.ReadImage(colin_l)
        size = np.array(img.GetSize())
        corner = np.array(img.TransformContinuousIndexToPhysicalPoint([float(s - 1) for s in size]))
        origin = np.array(img.GetOrigin())
        centre = 0.5 * (corner + origin)
        extent = np.abs(corner - origin)
        M = random_affine(np.random.default_rng(seed), extent)
        log.info("random affine (seed %d):\n%s", seed, np.array2string(M, precision=4))
        with open(os.path.join(work, f"affine_seed{seed}.txt"), "w") as fh:
            fh.write("# pull-back world affine about the image centre, LPS mm\n")
            np.savetxt(fh, M, fmt="%.6f")
        sitk.WriteImage(apply_affine(img, M, centre, False), colin_a)
        sitk.WriteImage(apply_affine(lab, M, centre, True), colin_al)
    return [
        Pair("mni<-colin", colin, mni, colin_l, mni_l, map_fwd),
        Pair("colin<-mni", mni, colin, mni_l, colin_l, map_rev),
        Pair("mni<-colinA", colin_a, mni, colin_al, mni_l, map_fwd),
        Pair("colinA<-mni", mni, colin_a, mni_l, colin_al, map_rev),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--methods", default="identity,opt,net-s1,net-s2,net-s3,ants-syn,demons")
    ap.add_argument("--syncc-pairs", type=int, default=2,
                    help="run ants-syncc on the first N pairs (0: skip; ~9 min per registration on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--in-process", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    work = os.path.join(args.out, "real")
    pairs = prepare(args.data_dir, os.path.join(work, "inputs"), args.seed)
    write_pairs(pairs, os.path.join(work, "pairs.csv"))
    methods = [m for m in args.methods.split(",") if m]
    cfg = EvalConfig(methods=methods, out_dir=work, spacing=args.spacing, isolate=not args.in_process)
    evaluate(pairs, cfg, rank=0, world=1, progress=False)
    if args.syncc_pairs > 0:
        sub = pairs[: args.syncc_pairs]
        evaluate(sub, EvalConfig(methods=["ants-syncc"], out_dir=work, spacing=args.spacing,
                                 isolate=not args.in_process), rank=0, world=1, progress=False)
        methods = methods + ["ants-syncc"]
    full = EvalConfig(methods=methods, out_dir=work, spacing=args.spacing)
    merge(pairs, full)
    shutil.copyfile(os.path.join(work, "results.csv"), os.path.join(args.out, "real_results.csv"))
    shutil.copyfile(os.path.join(work, "summary.md"), os.path.join(args.out, "real_summary.md"))
    shutil.copyfile(os.path.join(work, "summary.csv"), os.path.join(args.out, "real_summary.csv"))
    with open(os.path.join(work, "summary.md")) as fh:
        sys.stdout.write(fh.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
