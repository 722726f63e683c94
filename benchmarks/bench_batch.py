"""Cohort batch throughput: ``avsm register --pairs`` with each engine, disk per pair, and 10 000 pairs extrapolated.

Pairs: ``--pairs`` (default 64) real IXI T1 heads of ``<data-dir>/ixi185`` registered to one
template subject (the first in ID order; the next N subjects are the moving images), all
resampled to ``--spacing`` mm (default 4 mm, about 60×60×45 voxels) so that a pair takes
seconds, not minutes.  Without the IXI folder, the bundled demo pair is used: N copies of the
demo moving image under small random affines (seeded), registered to the demo fixed image.

Scenarios (each a fresh output folder, each the whole ``avsm register --pairs`` command line,
start-up included, timed from the outside; ``--method opt --preset fast``):

* ``local1``: one process (``--workers 1``), threads: every available CPU;
* ``local2``: two local worker processes (``--workers 2``), the CPUs split between them;
* ``dask2``: ``--scheduler dask --workers 2`` (a Dask LocalCluster, 2 processes, 1 thread each);
* ``shards2``: two processes ``--shard 0/2`` and ``--shard 1/2`` started together on one output
  folder (as two SLURM array tasks on one node, each with ``--threads`` its half of the CPUs),
  then ``avsm status``; per-shard and total rate;
* ``avsm-format``: ``--format avsm`` (the compact transform only) on ``--format-pairs`` pairs,
  for the disk per pair against the default (``ants,avsm``) of ``local1``.

Each scenario reports pairs per minute (pairs done / wall time), and every scenario checks
that every pair is done.  The 10 000-pair figures are linear extrapolations of the measured
rate and disk per pair (one machine like this one; a SLURM array of K such nodes divides the
time by K).

Usage::

    python benchmarks/bench_batch.py --data-dir ../shared/data                 # 64 pairs, everything
    python benchmarks/bench_batch.py --pairs 2 --scenarios local1 --format-pairs 2   # smoke check

Scenarios not rerun keep their figures from the last ``bench_batch.json`` in ``<out>``.
Writes ``<out>/bench_batch.json`` and ``<out>/bench_batch.md`` (default out:
``benchmarks/results/batch``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

log = logging.getLogger("bench_batch")

SCENARIOS = ("local1", "local2", "dask2", "shards2", "avsm-format")
N_EXTRAPOLATE = 10_000


# --------------------------------------------------------------------------- inputs


def _resample(img: sitk.Image, spacing: float, interp: int = sitk.sitkLinear) -> sitk.Image:
    """``img`` on a grid of ``spacing`` mm over the same box (Gaussian pre-smoothing for linear)."""
    old_sp = np.array(img.GetSpacing())
    size = [max(8, int(round(n * s / spacing))) for n, s in zip(img.GetSize(), old_sp)]
    if interp == sitk.sitkLinear and spacing > old_sp.min():
        sig = [max(0.0, 0.5 * (spacing ** 2 - s ** 2) ** 0.5) for s in old_sp]
        img = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), sig)
    ref = sitk.Image(size, img.GetPixelID())
    ref.SetSpacing([spacing] * 3)
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin(img.GetOrigin())
    return sitk.Resample(img, ref, sitk.Transform(), interp, 0.0)


def prepare_ixi(data_dir: str, n: int, spacing: float, inputs: str) -> list[tuple[str, str, str]]:
    """``(name, moving, fixed)``: the first IXI subject is the template, the next ``n`` the moving images."""
    d = os.path.join(os.path.abspath(data_dir), "ixi185")
    subjects = sorted(f[: -len("_T1.nii.gz")] for f in os.listdir(d) if f.endswith("_T1.nii.gz"))
    if len(subjects) < n + 1:
        raise SystemExit(f"{d} has {len(subjects)} subjects; need {n + 1}")
    os.makedirs(inputs, exist_ok=True)
    paths = {}
    for s in subjects[: n + 1]:
        dst = os.path.join(inputs, f"{s}.nii.gz")
        if not os.path.exists(dst):
            sitk.WriteImage(_resample(sitk.ReadImage(os.path.join(d, f"{s}_T1.nii.gz")), spacing), dst)
        paths[s] = dst
    template = subjects[0]
    return [(s, paths[s], paths[template]) for s in subjects[1: n + 1]]


def prepare_demo(n: int, spacing: float, inputs: str, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(name, moving, fixed)``: the demo moving image under ``n`` small random affines, to the demo fixed."""
    from avsm.data import demo_paths

    d = demo_paths()
    os.makedirs(inputs, exist_ok=True)
    fixed = os.path.join(inputs, "fixed.nii.gz")
    sitk.WriteImage(_resample(sitk.ReadImage(str(d["fixed"])), spacing), fixed)
    mov = _resample(sitk.ReadImage(str(d["moving"])), spacing)
    rng = np.random.default_rng(seed)
    centre = mov.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in mov.GetSize()])
    out = []
    for i in range(n):
        t = sitk.AffineTransform(3)
        t.SetCenter(centre)
        a = np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3))
        t.SetMatrix(a.ravel().tolist())
        t.SetTranslation(rng.uniform(-4, 4, 3).tolist())
        path = os.path.join(inputs, f"demo{i:03d}.nii.gz")
        sitk.WriteImage(sitk.Resample(mov, mov, t, sitk.sitkLinear, 0.0), path)
        out.append((f"demo{i:03d}", path, fixed))
    return out


def write_csv(rows: Sequence[tuple[str, str, str]], path: str) -> str:
    with open(path, "w") as fh:
        fh.write("name,moving,fixed\n")
        for name, m, f in rows:
            fh.write(f"{name},{m},{f}\n")
    return path


# --------------------------------------------------------------------------- runs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("SLURM_ARRAY_TASK_ID", "RANK", "WORLD_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(k, None)
    return env


def _cmd(csv_path: str, out: str, extra: Sequence[str], reg: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "avsm.cli.main", "register", "--pairs", csv_path, "--out-dir", out, "--quiet",
            *reg, *extra]


def _done(out: str) -> int:
    with open(os.path.join(out, "manifest.json")) as fh:
        pairs = json.load(fh)["pairs"]
    return sum(p["status"] in ("done", "skipped") for p in pairs)


def disk_per_pair(out: str) -> tuple[float, float]:
    """Mean bytes per done pair: outputs (incl. done.json), and the batch state (.avsm-batch) shared out."""
    with open(os.path.join(out, "manifest.json")) as fh:
        pairs = [p for p in json.load(fh)["pairs"] if p["status"] in ("done", "skipped")]
    sizes = []
    for p in pairs:
        total = 0
        for base, _, files in os.walk(p["out_dir"]):
            total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
        sizes.append(total)
    state = 0
    for base, _, files in os.walk(os.path.join(out, ".avsm-batch")):
        state += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    n = max(1, len(pairs))
    return float(np.mean(sizes)) if sizes else float("nan"), state / n


def run_one(name: str, csv_path: str, out: str, n: int, extra: Sequence[str], reg: Sequence[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(_cmd(csv_path, out, extra, reg), env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name} failed ({p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    done = _done(out)
    if done != n:
        raise SystemExit(f"{name}: {done} of {n} pairs done")
    disk, state = disk_per_pair(out)
    return {"scenario": name, "pairs": n, "wall_s": wall, "pairs_per_min": 60.0 * n / wall, "disk_per_pair_mb":
            disk / 1e6, "state_per_pair_kb": state / 1e3, "args": list(extra)}


def run_shards(csv_path: str, out: str, n: int, shards: int, reg: Sequence[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    # each shard gets its share of the CPUs, as SLURM's --cpus-per-task gives each array task its own
    # (two shards with every CPU each oversubscribe the cores 2x and run ~5x slower)
    threads = max(1, __import__("avsm.threads", fromlist=["x"]).available_cpus() // shards)
    procs = [subprocess.Popen(_cmd(csv_path, out, ["--shard", f"{i}/{shards}", "--workers", "1",
                                                   "--threads", str(threads)], reg),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    per = []
    for i, p in enumerate(procs):
        so, se = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"shard {i} failed: {so[-1500:]} {se[-1500:]}")
        per.append(time.perf_counter() - t0)
    wall = max(per)
    st = subprocess.run([sys.executable, "-m", "avsm.cli.main", "status", out], env=_env(), capture_output=True,
                        text=True)
    if st.returncode != 0:
        raise SystemExit(f"avsm status: {st.stdout[-1500:]}")
    done = _done(out)
    if done != n:
        raise SystemExit(f"shards: {done} of {n} pairs done")
    counts = [len(range(i, n, shards)) for i in range(shards)]
    disk, state = disk_per_pair(out)
    return {"scenario": f"shards{shards}", "pairs": n, "wall_s": wall, "pairs_per_min": 60.0 * n / wall,
            "per_shard_pairs_per_min": [60.0 * c / w for c, w in zip(counts, per)],
            "per_shard_wall_s": per, "disk_per_pair_mb": disk / 1e6, "state_per_pair_kb": state / 1e3,
            "args": ["--shard", f"I/{shards}", "--threads", str(threads)]}


# --------------------------------------------------------------------------- report


def _hours(minutes: float) -> str:
    return f"{minutes / 60:.1f} h" if minutes >= 90 else f"{minutes:.0f} min"


def table(results: Sequence[dict], default_disk_mb: float | None) -> str:
    lines = ["| scenario | pairs | wall (s) | pairs/min | per shard (pairs/min) | disk/pair (MB) "
             "| batch state/pair (kB) | 10 000 pairs: time | 10 000 pairs: disk |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per = ", ".join(f"{v:.1f}" for v in r.get("per_shard_pairs_per_min", [])) or "–"
        t = N_EXTRAPOLATE / r["pairs_per_min"]
        lines.append(f"| {r['scenario']} | {r['pairs']} | {r['wall_s']:.1f} | {r['pairs_per_min']:.2f} | {per} "
                     f"| {r['disk_per_pair_mb']:.2f} | {r['state_per_pair_kb']:.1f} | {_hours(t)} "
                     f"| {N_EXTRAPOLATE * r['disk_per_pair_mb'] / 1e3:.1f} GB |")
    if default_disk_mb:
        lines.append("")
        lines.append(f"Disk for {N_EXTRAPOLATE} pairs, default formats (ants,avsm): "
                     f"{N_EXTRAPOLATE * default_disk_mb / 1e3:.1f} GB; extrapolated linearly from the measured "
                     "per-pair sizes and rates (one machine; a SLURM array over K nodes divides the time by K).")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--spacing", type=float, default=4.0, help="mm of the resampled inputs")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--format-pairs", type=int, default=8, help="pairs of the --format avsm run")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "batch"))
    ap.add_argument("--demo", action="store_true", help="use the demo pair variants even if IXI is there")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = set(scen) - set(SCENARIOS)
    if bad:
        raise SystemExit(f"unknown scenario(s) {sorted(bad)}; choose from {SCENARIOS}")
    os.makedirs(args.out, exist_ok=True)
    inputs = os.path.join(args.out, "inputs")
    if not args.demo and os.path.isdir(os.path.join(args.data_dir, "ixi185")):
        rows, source = prepare_ixi(args.data_dir, args.pairs, args.spacing, inputs), "IXI T1 (ixi185)"
    else:
        rows, source = prepare_demo(args.pairs, args.spacing, inputs), "demo pair variants"
    csv_path = write_csv(rows, os.path.join(args.out, "pairs.csv"))
    small = write_csv(rows[: args.format_pairs], os.path.join(args.out, "pairs_format.csv"))
    reg = ["--method", "opt", "--preset", "fast", "--spacing", str(args.spacing)]
    log.info("%d pairs (%s) at %.1f mm; CPUs available: %d", len(rows), source, args.spacing,
             __import__("avsm.threads", fromlist=["x"]).available_cpus())
    results = []
    runs = {"local1": ("local1", ["--workers", "1"]), "local2": ("local2", ["--workers", "2"]),
            "dask2": ("dask2", ["--scheduler", "dask", "--workers", "2"])}
    for s in scen:
        log.info("scenario %s ...", s)
        if s in runs:
            name, extra = runs[s]
            results.append(run_one(name, csv_path, os.path.join(args.out, s), len(rows), extra, reg))
        elif s == "shards2":
            results.append(run_shards(csv_path, os.path.join(args.out, s), len(rows), 2, reg))
        elif s == "avsm-format":
            n = min(args.format_pairs, len(rows))
            results.append(run_one("avsm-format", small, os.path.join(args.out, s), n,
                                   ["--workers", "1", "--format", "avsm"], reg))
        log.info("  %s", json.dumps(results[-1]))
    # scenarios not rerun keep their last figures (same inputs: the same pairs.csv)
    prev_path = os.path.join(args.out, "bench_batch.json")
    if os.path.exists(prev_path):
        prev = json.load(open(prev_path))
        if prev.get("source") == source and prev.get("spacing") == args.spacing:
            ran = {r["scenario"] for r in results}
            kept = [r for r in prev.get("results", []) if r["scenario"] not in ran and r["pairs"] == len(rows)
                    or r["scenario"] == "avsm-format" and "avsm-format" not in ran]
            order = {name: i for i, name in enumerate(SCENARIOS + ("shards2",))}
            results = sorted(kept + results, key=lambda r: order.get(r["scenario"], 99))
    default_disk = next((r["disk_per_pair_mb"] for r in results if r["scenario"] in ("local1", "local2")), None)
    text = (f"{len(rows)} pairs: {source} at {args.spacing} mm to one template, `--method opt --preset fast`; "
            f"{os.cpu_count()} CPUs ({__import__('avsm.threads', fromlist=['x']).available_cpus()} available), "
            f"{time.strftime('%Y-%m-%d %H:%M')}\n\n" + table(results, default_disk))
    with open(os.path.join(args.out, "bench_batch.json"), "w") as fh:
        json.dump({"source": source, "spacing": args.spacing, "results": results}, fh, indent=1)
    with open(os.path.join(args.out, "bench_batch.md"), "w") as fh:
        fh.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
