"""The network on the held-out IXI validation pairs, and its CPU time against the working spacing.

Part 1 (accuracy, working grid): the fixed validation pairs the trainer selects checkpoints
on (:func:`avsm.train.mixture.build_validation`: held-out IXI validation subjects, half whole
head, half skull-stripped, each moving image posed at random and initialised as at
inference).  For each model: Dice over the shared DLMUSE labels at the working resolution
after the initialisation, after the affine network (7 steps, without and with the affine
guard), and after the vSVF steps; how often the guard fires (keeps an earlier step than the
last one, and which).

Part 2 (time): ``register(method='net')`` on a 1 mm skull-stripped brain pair
(OASIS-TRT-20 trt01 ← trt02, 256×256×160) at working spacings 4.2, 3 and 2 mm: the stage
times of ``summary.json`` (prepare, init, network) and the registration proper
(their sum), best of ``--repeats`` in one process after a warm-up.  The model was trained at
its own spacing; at other spacings only the time is meaningful.

Usage::

    python benchmarks/bench_net_validation.py --data-dir ../shared/data \
        --models bundled=src/avsm/data/weights/avsm_brain.pt,new=runs/cohort/vsvfB/best.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from avsm.core.coords import affine_map  # noqa: E402
from avsm.core.sampling import warp  # noqa: E402
from avsm.metrics.overlap import dice_per_label  # noqa: E402
from avsm.train.mixture import build_validation  # noqa: E402

log = logging.getLogger("bench_net_validation")


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    d = dice_per_label(a.numpy(), b.numpy())
    vals = [v for v in d.values() if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


@torch.no_grad()
def validation_part(name: str, path: str, items: list[dict]) -> dict:
    from avsm.models.pretrained import load_pretrained

    model = load_pretrained(path)
    rows = []
    for it in items:
        m, f = it["moving"][None], it["fixed"][None]
        ml, fl = it["moving_labels"][None], it["fixed_labels"][0]
        shape = tuple(int(s) for s in f.shape[2:])
        row = {"pair": it["name"], "init": _dice(ml[0, 0], fl)}
        model.config.affine_guard = False
        out = model(m, f, vsvf_steps=0)
        row["affine"] = _dice(warp(ml, affine_map(out.A, out.b, shape), mode="nearest")[0, 0], fl)
        model.config.affine_guard = True
        out = model(m, f, vsvf_steps=0)
        row["guard_choice"] = model.last_affine_choice[0]
        row["affine_guard"] = _dice(warp(ml, affine_map(out.A, out.b, shape), mode="nearest")[0, 0], fl)
        full = model(m, f)
        row["net"] = _dice(warp(ml, full.phi, mode="nearest")[0, 0], fl)
        rows.append(row)
    steps = model.config.affine_steps_test
    fired = [r["guard_choice"] != steps for r in rows]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("init", "affine", "affine_guard", "net")}
    summary.update({"model": name, "n": len(rows), "guard_fired": int(sum(fired)),
                    "guard_choices": [r["guard_choice"] for r in rows]})
    return {"summary": summary, "rows": rows}


def timing_part(path: str, data_dir: str, spacings: list[float], repeats: int) -> list[dict]:
    from avsm.api import register
    from avsm.io.image import load_image

    d = os.path.join(data_dir, "oasis-trt20")
    fixed, moving = load_image(f"{d}/trt01.nii.gz"), load_image(f"{d}/trt02.nii.gz")
    register(fixed=fixed, moving=moving, method="net", model=path, progress=False)  # warm-up
    out = []
    for sp in spacings:
        best: dict | None = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = register(fixed=fixed, moving=moving, method="net", model=path, spacing=sp, progress=False)
            wall = time.perf_counter() - t0
            t = res.timings
            proper = sum(t.get(k, 0.0) for k in ("prepare", "init", "network"))
            rec = {"spacing": sp, "working_shape": list(res.fixed_grid.shape), "registration_s": round(proper, 3),
                   **{k: round(t.get(k, 0.0), 3) for k in ("prepare", "init", "network")},
                   "register_call_s": round(wall, 3)}
            if best is None or proper < best["registration_s"]:
                best = rec
        assert best is not None
        out.append(best)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--models", required=True, help="NAME=PATH[,NAME=PATH...]")
    ap.add_argument("--val-pairs", type=int, default=12)
    ap.add_argument("--spacing", type=float, default=4.2, help="working spacing of the validation pairs")
    ap.add_argument("--time-spacings", default="4.2,3,2")
    ap.add_argument("--time-model", default=None, help="model NAME for part 2 (default: the last)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "net_validation.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.models.split(","))
    items = build_validation(args.data_dir, args.spacing, args.val_pairs, cache="runs/cache")
    report: dict = {"validation": {}, "timing": None, "threads": args.threads}
    for name, path in models.items():
        r = validation_part(name, path, items)
        report["validation"][name] = r
        s = r["summary"]
        sys.stdout.write(f"{name}: init {s['init']:.4f}  affine {s['affine']:.4f}  affine+guard {s['affine_guard']:.4f}"
                         f"  net {s['net']:.4f}  guard fired {s['guard_fired']}/{s['n']} {s['guard_choices']}\n")
    tname = args.time_model or list(models)[-1]
    spacings = [float(x) for x in args.time_spacings.split(",") if x]
    if spacings:
        report["timing"] = {"model": tname, "rows": timing_part(models[tname], args.data_dir, spacings, args.repeats)}
        for row in report["timing"]["rows"]:
            sys.stdout.write(json.dumps(row) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
