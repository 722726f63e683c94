#!/usr/bin/env python
"""AVSM network figures for issue 3: inference time/memory by size and step count, and
training throughput with one process and with ``torchrun`` (2 processes, gloo).

Each measurement runs in a fresh subprocess so that its peak resident memory
(``VmHWM``) is its own.  Prints one JSON line per measurement and writes them to
``--out`` (JSON lines).

* ``infer``: the bundled model (``avsm_brain.pt``) on a pair of real brains
  resampled to the size asked for (MNI 2009c ← Colin27 from ``--data-dir``,
  or smooth random volumes without it), ``affine_steps`` 7 and ``vsvf_steps``
  1/2/3; time of the forward pass alone (after one warm-up pass) and of the
  whole ``avsm.register(method='net')`` call at the default working grid.
* ``train``: ``avsm train --stage vsvf`` for a fixed number of steps on a
  prepared folder (``scripts/prepare_training_data.py``), 1 process vs
  ``torchrun --nproc-per-node 2`` (1 thread per process); pairs/s from the
  trainer's own epoch timing, peak RSS of the largest process.

Usage::

    PYTHONPATH=src python benchmarks/bench_network.py --data-dir ../shared/data \
        --prepared runs/pretrained/prepared --out benchmarks/results/network.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
log = logging.getLogger("bench_network")


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def infer_job(size: tuple[int, int, int], vsvf_steps: int, threads: int, data_dir: str | None) -> dict:
    """Forward pass of the bundled model on a ``size`` pair (run inside a subprocess)."""
    import numpy as np
    import torch

    from avsm.core.coords import identity_affine
    from avsm.models.pretrained import load_pretrained

    torch.set_num_threads(threads)
    model = load_pretrained()
    model.eval()
    if data_dir:
        from avsm.api import to_working
        from avsm.io.image import load_image

        fixed = load_image(os.path.join(data_dir, "mni2009c_brain.nii.gz"))
        moving = load_image(os.path.join(data_dir, "colin27_brain.nii.gz"))
        fg = fixed.grid.canonical().resized(size)
        mg = moving.grid.canonical().resized(size)
        f = torch.from_numpy(to_working(fixed, fg))[None, None]
        m = torch.from_numpy(to_working(moving, mg))[None, None]
        source = "MNI2009c <- Colin27 resampled over their own boxes"
    else:
        g = torch.Generator().manual_seed(0)
        f = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *size, generator=g), 5, 1, 2)
        m = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *size, generator=g), 5, 1, 2)
        source = "smooth random volumes"
    A0, b0 = identity_affine(1)
    times = []
    with torch.no_grad():
        for _ in range(2):  # warm-up, then the timed pass
            t0 = time.perf_counter()
            out = model(m, f, A0, b0, affine_steps=7, vsvf_steps=vsvf_steps)
            times.append(time.perf_counter() - t0)
    det_ok = bool(torch.isfinite(out.phi).all())
    return {"kind": "infer", "size": list(size), "vsvf_steps": vsvf_steps, "affine_steps": 7,
            "threads": threads, "forward_s": round(times[-1], 3), "first_pass_s": round(times[0], 3),
            "peak_rss_mb": round(_vmhwm_mb(), 1), "finite": det_ok, "input": source,
            "torch": torch.__version__, "numpy": np.__version__}


def register_job(data_dir: str, threads: int) -> dict:
    """Whole ``avsm.register(method='net')`` on the real pair at the default working grid."""
    import torch

    from avsm.api import register
    from avsm.io.image import load_image

    torch.set_num_threads(threads)
    fixed = load_image(os.path.join(data_dir, "mni2009c_brain.nii.gz"))
    moving = load_image(os.path.join(data_dir, "colin27_brain.nii.gz"))
    register(fixed=fixed, moving=moving, method="net", progress=False)  # warm-up (model load)
    t0 = time.perf_counter()
    res = register(fixed=fixed, moving=moving, method="net", progress=False)
    wall = time.perf_counter() - t0
    return {"kind": "register", "method": "net", "threads": threads, "wall_s": round(wall, 3),
            "timings": {k: round(float(v), 3) for k, v in res.timings.items()},
            "peak_rss_mb": round(_vmhwm_mb(), 1)}


def _subprocess(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] if out.stderr else "failed", "args": args}
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_run(prepared: str, nproc: int, iters: int) -> dict:
    """``avsm train`` (stage vsvf) for ``iters`` steps per process; pairs/s and peak RSS."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="avsm-tp-") as tmp:
        init = Path(tmp) / "init"
        common = ["train", "--data", prepared, "--threads", "1", "--val-per-volume", "0", "--seed", "0"]
        # a stage-1 (affine) model to start stage 2 from: the bundled model's weights
        from_w = str(SRC / "avsm" / "data" / "weights" / "avsm_brain.pt")
        args = [*common, "--out", str(init), "--stage", "vsvf", "--init-from", from_w, "--epochs", "2",
                "--iters-per-epoch", str(iters)]
        if nproc == 1:
            cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "avsm.cli.main", *args]
        else:
            cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "torch.distributed.run",
                   "--nproc-per-node", str(nproc), "--master-port", "29533", "-m", "avsm.cli.main", *args]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return {"kind": "train", "nproc": nproc, "error": p.stderr.strip().splitlines()[-3:]}
        peak_kb = float(p.stderr.strip().splitlines()[-1])
        recs = [json.loads(x) for x in (init / "metrics.jsonl").read_text().splitlines()]
        ep = [r for r in recs if r.get("kind") == "epoch"]
        sec = float(ep[-1]["seconds"])  # the second epoch: no start-up costs
        pairs = iters * nproc
        return {"kind": "train", "stage": "vsvf", "nproc": nproc, "threads_per_proc": 1,
                "steps_per_proc": iters, "epoch_s": round(sec, 2), "pairs_per_s": round(pairs / sec, 3),
                "peak_rss_mb_largest_process": round(peak_kb / 1024.0, 1), "wall_s_incl_startup": round(wall, 1),
                "shape": recs[0].get("shape") if recs else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="../shared/data (real brains); random volumes without it")
    ap.add_argument("--prepared", default=None, help="prepared training folder (training throughput)")
    ap.add_argument("--sizes", default="48x64x48,80x192x192")
    ap.add_argument("--steps", default="1,2,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-iters", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "network.jsonl"))
    ap.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._job:  # inside a subprocess
        spec = json.loads(a._job)
        if spec["kind"] == "infer":
            rec = infer_job(tuple(spec["size"]), spec["vsvf_steps"], spec["threads"], spec.get("data_dir"))
        else:
            rec = register_job(spec["data_dir"], spec["threads"])
        sys.stdout.write(json.dumps(rec) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recs = []
    for s in a.sizes.split(","):
        size = tuple(int(v) for v in s.lower().split("x"))
        for k in (int(v) for v in a.steps.split(",")):
            recs.append(_subprocess(["--_job", json.dumps({"kind": "infer", "size": size, "vsvf_steps": k,
                                                             "threads": a.threads, "data_dir": a.data_dir})]))
            log.info(json.dumps(recs[-1]))
    if a.data_dir:
        recs.append(_subprocess(["--_job", json.dumps({"kind": "register", "data_dir": a.data_dir,
                                                         "threads": a.threads})]))
        log.info(json.dumps(recs[-1]))
    if a.prepared:
        for n in (1, 2):
            recs.append(train_run(a.prepared, n, a.train_iters))
            log.info(json.dumps(recs[-1]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
