"""Whole-process scale benchmark: ``avsm register`` (default method, ``opt``) and ANTs SyN, from
files to files, at 128³, 256³ and a 512×512×300 chest-CT pair, one run.

Each registration is one fresh process timed by ``/usr/bin/time`` (wall seconds and
peak resident set, whole process: imports, reading, registration, every output
written).  avsm's stage times come from its ``summary.json``.  ANTs is antspyx
``ants.registration(type_of_transform='SyN')`` (2 threads) followed by
``ants.apply_transforms`` and writing the warped image, which is what its files-to-files
use costs; its transforms are written by antspyx itself.

Pairs:

* ``128``, ``256``: Colin27 → MNI 2009c (real skull-stripped brains, two subjects), each
  resampled onto n³ voxels over its own box (so 256³ is finer than 1 mm);
* ``ct512``: the two real chest CTs of ``../shared/data/ct`` (baseline → follow-up, one
  patient) resampled to 512×512×300 voxels (int16), with their lung masks for Dice.

Usage::

    python benchmarks/bench_scale_process.py --data-dir ../shared/data [--pairs 128,256,ct512]
        [--methods default,opt,ants-syn]

Writes ``benchmarks/results/scale_process.csv`` and ``scale_process.md`` and prints the table
with each method's time and memory as a ratio of SyN's on the same pair.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ANTS_SCRIPT = """
import sys, time, ants, numpy as np
f, m, out = sys.argv[1:4]
t0 = time.perf_counter()
fi, mi = ants.image_read(f), ants.image_read(m)
t1 = time.perf_counter()
reg = ants.registration(fixed=fi, moving=mi, type_of_transform="SyN", outprefix=out + "/ants_")
t2 = time.perf_counter()
w = ants.apply_transforms(fixed=fi, moving=mi, transformlist=reg["fwdtransforms"])
ants.image_write(w, out + "/warped.nii.gz")
if len(sys.argv) > 5:
    ml = ants.image_read(sys.argv[5])
    wl = ants.apply_transforms(fixed=fi, moving=ml, transformlist=reg["fwdtransforms"],
                               interpolator="genericLabel")
    fl = ants.image_read(sys.argv[4]).numpy() > 0
    wl = wl.numpy() > 0
    print("DICE", 2 * (fl & wl).sum() / (fl.sum() + wl.sum()))
print("STAGES", t1 - t0, t2 - t1, time.perf_counter() - t2)
"""


def ct_pair(data_dir: str, work: str) -> tuple[str, str, str, str]:
    """The chest-CT pair and masks at 512×512×300 (files cached in ``work``)."""
    names = []
    for case in ("baseline", "followup"):
        for suffix in ("", "_mask"):
            out = os.path.join(work, f"{case}{suffix}_512.nii.gz")
            names.append(out)
            if os.path.exists(out):
                continue
            img = sitk.ReadImage(os.path.join(data_dir, "ct", f"3DCT_lung_{case}{suffix}.mha"))
            new = (512, 512, 300)
            sp = tuple(s * z / n for s, z, n in zip(img.GetSpacing(), img.GetSize(), new))
            interp = sitk.sitkNearestNeighbor if suffix else sitk.sitkLinear
            r = sitk.Resample(img, new, sitk.Transform(), interp, img.GetOrigin(), sp, img.GetDirection(),
                              0 if suffix else -1000, img.GetPixelID())
            sitk.WriteImage(r, out)
    fixed, fixed_mask, moving, moving_mask = names
    return fixed, moving, fixed_mask, moving_mask


def brain_pair(data_dir: str, work: str, n: int) -> tuple[str, str]:
    """Colin27 (moving) and MNI 2009c (fixed) brains, each resampled to ``n``³ voxels over its own box."""
    out = []
    for name in ("mni2009c_brain", "colin27_brain"):
        path = os.path.join(work, f"{name}_{n}.nii.gz")
        out.append(path)
        if os.path.exists(path):
            continue
        img = sitk.ReadImage(os.path.join(data_dir, f"{name}.nii.gz"), sitk.sitkFloat32)
        size = (n, n, n)
        sp = tuple(s * (z - 1) / (n - 1) for s, z in zip(img.GetSpacing(), img.GetSize()))
        r = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), sp, img.GetDirection(),
                          0.0, sitk.sitkFloat32)
        sitk.WriteImage(r, path)
    return out[0], out[1]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` under ``/usr/bin/time``; returns (wall s, peak RSS MB, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tf.name, *cmd], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
        wall, kb = tf.read().split()[-2:]
    return float(wall), float(kb) / 1024.0, proc.stdout


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--pairs", default="128,256,ct512")
    ap.add_argument("--methods", default="default,opt,ants-syn")
    args = ap.parse_args(argv)
    work = os.path.join(args.out, "scale_process")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2"}
    rows = []
    for name in args.pairs.split(","):
        labels: tuple[str, str] | None = None
        if name == "ct512":
            fixed, moving, fl, ml = ct_pair(args.data_dir, work)
            labels = (fl, ml)
        else:
            fixed, moving = brain_pair(args.data_dir, work, int(name))
        for method in args.methods.split(","):
            out = os.path.join(work, f"{name}_{method}")
            os.makedirs(out, exist_ok=True)
            row: dict = {"pair": name, "voxels": int(np.prod(sitk.ReadImage(fixed).GetSize())), "method": method}
            if method == "ants-syn":
                cmd = [sys.executable, "-c", ANTS_SCRIPT, fixed, moving, out, *(labels or ())]
                wall, mb, stdout = timed(cmd, env)
                for line in stdout.splitlines():
                    if line.startswith("DICE"):
                        row["dice"] = round(float(line.split()[1]), 4)
                    if line.startswith("STAGES"):
                        r, g, w = (float(v) for v in line.split()[1:])
                        row["stages"] = f"read {r:.1f}, registration {g:.1f}, warp+write {w:.1f}"
            else:
                cmd = ["avsm", "register", "--fixed", fixed, "--moving", moving, "--out", out, "--quiet"]
                if method != "default":
                    cmd += ["--method", method]
                if labels:
                    cmd += ["--fixed-labels", labels[0], "--moving-labels", labels[1]]
                wall, mb, _ = timed(cmd, env)
                with open(os.path.join(out, "summary.json")) as fh:
                    s = json.load(fh)
                row["method"] = f"{method} ({s['method']})"
                row["dice"] = s.get("mean_dice")
                row["folds"] = s["folds"]
                st = {k: v for k, v in s["timings_s"].items() if k != "total"}
                row["stages"] = ", ".join(f"{k} {v:.1f}" for k, v in st.items()) + \
                    f", outputs {s['time_outputs_s']:.1f}; registration peak {s['peak_rss_mb_registration']:.0f} MB"
            row["time_s"], row["peak_mb"] = round(wall, 1), round(mb)
            rows.append(row)
            sys.stderr.write(f"{row}\n")
    syn = {r["pair"]: r for r in rows if r["method"] == "ants-syn"}
    for r in rows:
        ref = syn.get(r["pair"])
        r["time_vs_syn"] = round(r["time_s"] / ref["time_s"], 2) if ref else None
        r["peak_vs_syn"] = round(r["peak_mb"] / ref["peak_mb"], 2) if ref else None
    keys = ["pair", "voxels", "method", "time_s", "time_vs_syn", "peak_mb", "peak_vs_syn", "dice", "folds", "stages"]
    with open(os.path.join(args.out, "scale_process.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows([{k: r.get(k) for k in keys} for r in rows])
    lines = ["| pair | method | whole process (s) | ÷ SyN | peak RSS (MB) | ÷ SyN | Dice | folds | stages (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['method']} | {r['time_s']} | {r.get('time_vs_syn')} | {r['peak_mb']} | "
                     f"{r.get('peak_vs_syn')} | {r.get('dice', '–')} | {r.get('folds', '–')} | {r.get('stages', '')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "scale_process.md"), "w") as fh:
        fh.write(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
