"""Native-resolution benchmark: 1 mm OASIS-TRT-20 brains, whole process, avsm against ANTs.

Every job is a fresh process, run one at a time, timed from outside (wall time and the
process's peak RSS from ``/usr/bin/time``), and each tool also reports its own registration time:

* ``avsm`` / ``avsm-<preset>``: ``avsm register --fixed F --moving M --moving-labels ML
  --out-dir OUT [--preset P]`` (the user's command: registration, warped image, warped labels,
  ANTs transforms, compact transform, summary); registration time = ``summary.json``
  ``time_registration_s``, output stage = ``time_outputs_s``.
* ``avsm-net``, ``avsm-net+opt``, ``avsm-net+opt-aopt`` (``--network-affine opt``), ``avsm-short``
  (``opt`` with ``--vsvf-iterations 60,20``: the default with half of its 2 mm level), ``avsm-affine``
  and ``avsm-net-affine`` (the affine stage of ``opt`` and of ``net`` alone): see :data:`AVSM_VARIANTS`.
* ``ants-syn``: antspyx ``ants.registration(fixed, moving, type_of_transform='SyN')``, then
  ``ants.apply_transforms(..., interpolator='genericLabel')`` on the labels and
  ``'linear'`` on the image, both written as ``.nii.gz`` (what a user of the ANTs call does);
  registration time = the ``ants.registration`` call.
* ``ants-syn-quick`` (``type_of_transform='antsRegistrationSyNQuick[s]'``) and
  ``ants-syn-cc`` (``'antsRegistrationSyN[s]'``: CC radius 2, 100x70x50x20 at 8,4,2,1; 44 min
  per 1 mm pair on 2 cores) the same way, only when asked for.

Dice: mean over the labels present in both label maps (label 74, a stray label of subject 03,
never scored), computed here from the written warped label map for every method alike;
folds: det J < 0 voxels as each tool's output gives them (avsm's ``summary.json``; for ANTs
from the composed field, computed here).

Pairs: the development pairs of the issue, five disjoint OASIS pairs (01,02) ... (09,10), both
directions (``--pairs`` to choose, e.g. ``01-02,02-01``).

Usage::

    python benchmarks/bench_native.py --data-dir ../shared/data --methods avsm,ants-syn \\
        --out benchmarks/results/native

Writes ``<out>/rows.csv`` (one row per job; a finished job is not rerun) and prints the
summary table with ratios against ``ants-syn``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

DEV_PAIRS = ("01-02", "02-01", "03-04", "04-03", "05-06", "06-05", "07-08", "08-07", "09-10", "10-09")
EXCLUDE = frozenset({74})
ANTS_CALLS = {"ants-syn": "SyN", "ants-syn-quick": "antsRegistrationSyNQuick[s]",
              "ants-syn-cc": "antsRegistrationSyN[s]"}
#: avsm variants by name (the arguments after the common ones); other ``avsm-<preset>`` names
#: run ``--preset <preset>``
AVSM_VARIANTS = {
    "avsm-net": ["--method", "net"],
    "avsm-net+opt": ["--method", "net+opt"],
    "avsm-net+opt-aopt": ["--method", "net+opt", "--network-affine", "opt"],
    "avsm-short": ["--vsvf-iterations", "60,20"],  # opt with half of its 2 mm iterations
    "avsm-affine": ["--vsvf-iterations", "0,0"],  # opt's affine stage alone
    "avsm-net-affine": ["--method", "net", "--vsvf-steps", "0"],  # the network's affine stage alone
}
FIELDS = ("pair", "method", "dice", "dice_affine", "folds", "registration_s", "outputs_s", "process_s",
          "peak_mb", "call")

ANTS_SCRIPT = r"""
import json, sys, time
import ants, numpy as np
fixed_p, moving_p, labels_p, out, kind = sys.argv[1:6]
f = ants.image_read(fixed_p); m = ants.image_read(moving_p); ml = ants.image_read(labels_p)
t = time.perf_counter()
reg = ants.registration(f, m, type_of_transform=kind, outprefix=out + "/tx_")
t_reg = time.perf_counter() - t
t = time.perf_counter()
w = ants.apply_transforms(f, m, reg["fwdtransforms"], interpolator="linear")
wl = ants.apply_transforms(f, ml, reg["fwdtransforms"], interpolator="genericLabel")
wa = ants.apply_transforms(f, ml, [t for t in reg["fwdtransforms"] if t.endswith(".mat")],
                           interpolator="genericLabel")
ants.image_write(w, out + "/warped.nii.gz"); ants.image_write(wl, out + "/warped_labels.nii.gz")
ants.image_write(wa, out + "/warped_labels_affine.nii.gz")
t_out = time.perf_counter() - t
json.dump({"time_registration_s": t_reg, "time_outputs_s": t_out, "fwd": reg["fwdtransforms"]},
          open(out + "/ants.json", "w"))
"""


def run_process(cmd: list[str], env: dict[str, str], log_path: str) -> tuple[float, float, int]:
    """Run ``cmd`` under ``/usr/bin/time``; return (wall s, peak RSS MB of the process, exit code).

    Not ``wait4`` on a child of this process: Linux carries a process's peak RSS across ``fork`` +
    ``exec``, so a child forked from this (large, after the Dice and fold computations) process
    would report this process's peak.  ``/usr/bin/time`` forks from its own small process.
    """
    stats = log_path + ".time"
    t = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(["/usr/bin/time", "-f", "%e %M", "-o", stats] + cmd, stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t
    peak_kb = float(open(stats).read().split()[-1])
    return wall, peak_kb / 1024.0, rc


def dice(pred_path: str, truth_path: str, moving_labels_path: str) -> float:
    import SimpleITK as sitk

    from avsm.metrics.overlap import dice_per_label, mean_dice

    pred = sitk.GetArrayFromImage(sitk.ReadImage(pred_path))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(truth_path))
    ml = sitk.GetArrayFromImage(sitk.ReadImage(moving_labels_path))
    labels = sorted((set(np.unique(truth).tolist()) & set(np.unique(ml).tolist())) - {0} - EXCLUDE)
    return mean_dice(dice_per_label(pred.astype(np.int64), truth.astype(np.int64), labels=labels))


def ants_folds_np(out: str, fixed_path: str) -> int:
    import ants

    info = json.load(open(os.path.join(out, "ants.json")))
    f = ants.image_read(fixed_path)
    field = ants.apply_transforms(f, f, info["fwd"], compose=os.path.join(out, "comp_"))
    d = ants.image_read(field).numpy().astype(np.float64)  # (x, y, z, 3) displacement in physical units
    sp = np.asarray(f.spacing, dtype=np.float64)
    dirm = np.asarray(f.direction, dtype=np.float64).reshape(3, 3)
    # Jacobian of x -> x + u(x) in physical coordinates: I + du/dX, with dX along direction columns
    grads = [np.gradient(d[..., c], *sp, edge_order=1) for c in range(3)]  # du_c/di (index axes)
    J = np.empty(d.shape[:3] + (3, 3))
    for c in range(3):
        for a in range(3):
            J[..., c, a] = grads[c][a]
    J = J @ dirm.T  # d u / d X (world), index derivative rotated into the world frame
    J = J + np.eye(3)
    return int((np.linalg.det(J) < 0).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--methods", default="avsm,ants-syn")
    ap.add_argument("--pairs", default=",".join(DEV_PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "native"))
    ap.add_argument("--avsm-args", default="", help="extra arguments for every avsm job")
    ap.add_argument("--summarise", action="store_true", help="only print the table of <out>/rows.csv")
    args = ap.parse_args(argv)
    if args.summarise:
        summarise(list(csv.DictReader(open(os.path.join(args.out, "rows.csv")))))
        return 0
    d = os.path.join(os.path.abspath(args.data_dir), "oasis-trt20")
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.csv")
    rows: list[dict[str, str]] = []
    if os.path.exists(rows_path):
        rows = list(csv.DictReader(open(rows_path)))
    done = {(r["pair"], r["method"]) for r in rows}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    for pair in args.pairs.split(","):
        fi, mi = pair.split("-")
        F, M = os.path.join(d, f"trt{fi}.nii.gz"), os.path.join(d, f"trt{mi}.nii.gz")
        FL, ML = os.path.join(d, f"trt{fi}_labels.nii.gz"), os.path.join(d, f"trt{mi}_labels.nii.gz")
        for method in args.methods.split(","):
            if (pair, method) in done:
                continue
            out = os.path.join(args.out, "jobs", method, pair)
            os.makedirs(out, exist_ok=True)
            if method in ANTS_CALLS:
                call = f"ants.registration(type_of_transform='{ANTS_CALLS[method]}') + apply_transforms"
                cmd = [sys.executable, "-c", ANTS_SCRIPT, F, M, ML, out, ANTS_CALLS[method]]
            else:
                cmd = ["avsm", "register", "--fixed", F, "--moving", M, "--moving-labels", ML, "--out-dir", out]
                if method in AVSM_VARIANTS:
                    cmd += AVSM_VARIANTS[method]
                elif "-" in method:
                    cmd += ["--preset", method.split("-", 1)[1]]
                cmd += args.avsm_args.split() if args.avsm_args else []
                call = " ".join(["avsm register"] + cmd[2:]).replace(d + "/", "")
            wall, peak, rc = run_process(cmd, env, os.path.join(out, "log.txt"))
            if rc != 0:
                print(f"{pair} {method}: exit {rc}, see {out}/log.txt", file=sys.stderr)
                continue
            if method in ANTS_CALLS:
                info = json.load(open(os.path.join(out, "ants.json")))
                folds = ants_folds_np(out, F)
                da = dice(os.path.join(out, "warped_labels_affine.nii.gz"), FL, ML)
            else:
                info = json.load(open(os.path.join(out, "summary.json")))
                folds = int(info.get("folds", info.get("jacobian", {}).get("folds", -1)))
                da = float("nan")
            row = {"pair": pair, "method": method,
                   "dice": f"{dice(os.path.join(out, 'warped_labels.nii.gz'), FL, ML):.4f}",
                   "dice_affine": f"{da:.4f}", "folds": str(folds),
                   "registration_s": f"{info['time_registration_s']:.1f}",
                   "outputs_s": f"{info['time_outputs_s']:.1f}", "process_s": f"{wall:.1f}",
                   "peak_mb": f"{peak:.0f}", "call": call}
            rows.append(row)
            print(" ".join(f"{k}={row[k]}" for k in FIELDS[:-1]), flush=True)
            with open(rows_path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(rows)
    summarise(rows)
    return 0


def summarise(rows: list[dict[str, str]], reference: str = "ants-syn") -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["pair"], r["method"]): r for r in rows}
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    print("\n| method | pairs | Dice | min Δ vs SyN | folds | registration s | outputs s | process s | peak MB |"
          " reg ÷ SyN | process ÷ SyN | peak ÷ SyN |")
    print("|" + "---|" * 12)
    for m in methods:
        ps = [p for p in pairs if (p, m) in by and (reference == m or (p, reference) in by)]
        if not ps:
            continue
        g = lambda k, mm=m: np.array([float(by[(p, mm)][k]) for p in ps])  # noqa: E731
        ratio = (lambda k: f"{np.mean(g(k)) / np.mean(g(k, reference)):.2f}") if all(
            (p, reference) in by for p in ps) else (lambda k: "")
        dmin = f"{np.min(g('dice') - g('dice', reference)):+.3f}" if all((p, reference) in by for p in ps) else ""
        print(f"| {m} | {len(ps)} | {np.mean(g('dice')):.3f} | {dmin} | {int(np.sum(g('folds')))} | "
              f"{np.mean(g('registration_s')):.1f} | {np.mean(g('outputs_s')):.1f} | {np.mean(g('process_s')):.1f}"
              f" | {np.mean(g('peak_mb')):.0f} | {ratio('registration_s')} | {ratio('process_s')} | "
              f"{ratio('peak_mb')} |")


if __name__ == "__main__":
    raise SystemExit(main())
