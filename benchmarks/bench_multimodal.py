"""Same-subject multi-modal and longitudinal pairs: rigid registration with MI, mk-LNCC and ANTs.

Cases (``../shared/data/multimodal``):

* ``chris PD -> T1``: one volunteer's proton-density image registered to the T1;
* ``ms T2W -> T1W`` and ``ms FLAIR -> T1W``: the MS patient's first visit;
* ``ms T1W visit 2 -> visit 1``: the longitudinal (rigid) case.

For each case a known rigid motion ``T`` (seeded: rotation up to 10° about a random
axis, translation up to 15 mm) is applied to the moving image.  With ``φ0`` the
registration of the original pair and ``φ1`` that of the moved pair, a method that
recovers the motion has ``φ1 = T⁻¹ ∘ φ0``; the error is ``|φ1(x) − T⁻¹(φ0(x))|`` in mm
over the fixed image's foreground (it needs no ground-truth alignment of the pair).

Methods: avsm rigid with ``--similarity mi`` and with ``lncc`` (mk-LNCC), and ANTs
rigid (antspyx ``type_of_transform='Rigid'``, Mattes MI), one after another.

Usage::

    PYTHONPATH=src python benchmarks/bench_multimodal.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from avsm.api import register  # noqa: E402
from avsm.io.image import Volume, load_image  # noqa: E402
from avsm.settings import preset  # noqa: E402
from avsm.transform import apply_homogeneous  # noqa: E402

log = logging.getLogger("bench_multimodal")

CASES = {
    "chris PD->T1": ("chris_PD.nii.gz", "chris_t1.nii.gz"),
    "ms T2W->T1W": ("openms_patient01/study1_T2W.nii.gz", "openms_patient01/study1_T1W.nii.gz"),
    "ms FLAIR->T1W": ("openms_patient01/study1_FLAIR.nii.gz", "openms_patient01/study1_T1W.nii.gz"),
    "ms T1W v2->v1": ("openms_patient01/study2_T1W.nii.gz", "openms_patient01/study1_T1W.nii.gz"),
}


def rigid_motion(seed: int, centre: np.ndarray) -> np.ndarray:
    """A seeded world rigid ``(4, 4)``: rotation ≤ 10° about a random axis through ``centre``, shift ≤ 15 mm."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(5.0, 10.0)) * rng.choice([-1, 1])
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = centre - R @ centre + rng.uniform(-15, 15, size=3)
    return M


def moved(vol: Volume, T: np.ndarray) -> Volume:
    """``vol`` resampled on its own grid through the pull-back ``T``: ``out(x) = vol(T x)``."""
    img = vol.to_sitk()
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(T[:3, :3].ravel().tolist())
    tx.SetTranslation(T[:3, 3].tolist())
    out = sitk.Resample(img, img, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, path=vol.path)


def world_map(method: str, fixed: Volume, moving: Volume) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    if method == "ants-rigid":
        from avsm.baselines.ants import ants_register

        res = ants_register(fixed, moving, type_of_transform="Rigid", inverse=False)
    else:
        sim = method.split("-")[-1]
        res = register(fixed=fixed, moving=moving, settings=preset("fast", method="opt", transform="rigid",
                                                                  similarity=sim), progress=False)
    return res.world_map(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--methods", default="rigid-mi,rigid-lncc,ants-rigid")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "multimodal.jsonl"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    d = os.path.join(os.path.abspath(args.data_dir), "multimodal")
    rows = []
    for case in args.cases.split(","):
        mpath, fpath = CASES[case]
        fixed, moving = load_image(os.path.join(d, fpath)), load_image(os.path.join(d, mpath))
        g = moving.grid
        centre = g.unit_to_world() @ np.array([0.5, 0.5, 0.5, 1.0])
        T = rigid_motion(args.seed, centre[:3])
        moving2 = moved(moving, T)
        fg = fixed.array > np.percentile(fixed.array, 60)  # foreground of the fixed image
        Tinv = np.linalg.inv(T)
        for method in args.methods.split(","):
            phi0, t0 = world_map(method, fixed, moving)
            phi1, t1 = world_map(method, fixed, moving2)
            want = apply_homogeneous(Tinv, phi0)
            err = (phi1 - want).norm(dim=1)[0].numpy()[fg]
            row = {"case": case, "method": method, "err_mean_mm": round(float(err.mean()), 3),
                   "err_p95_mm": round(float(np.percentile(err, 95)), 3), "time_s": round(t1, 2),
                   "time_original_s": round(t0, 2)}
            rows.append(row)
            log.info("%s", json.dumps(row))
    with open(args.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    sys.stdout.write("\n| case | method | error mean (mm) | error p95 (mm) | time (s) |\n|---|---|---|---|---|\n")
    for r in rows:
        sys.stdout.write(f"| {r['case']} | {r['method']} | {r['err_mean_mm']:.2f} | {r['err_p95_mm']:.2f} | "
                         f"{r['time_s']:.1f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
