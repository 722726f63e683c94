"""The bundled demo pair (2.5 mm T1 brains, 32 labels): the presets against antspyx SyN, one run.

Registration only (no outputs), each method once in this process after a warm-up of ANTs, 2
threads; Dice over the labels present in both maps, labels warped nearest.  The point: whether
the default runs within SyN's time on a coarse input, and what each preset gives there.

Usage::

    python benchmarks/bench_demo.py [--methods ants-syn,native,fast,paper]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from avsm.api import register  # noqa: E402
from avsm.io.image import load_image  # noqa: E402
from avsm.metrics.overlap import dice_per_label, mean_dice, shared_labels  # noqa: E402
from avsm.settings import preset  # noqa: E402

DEMO = os.path.join(HERE, "..", "src", "avsm", "data", "demo")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="ants-syn,native,fast")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    fixed, moving = load_image(f"{DEMO}/fixed.nii.gz"), load_image(f"{DEMO}/moving.nii.gz")
    fl = load_image(f"{DEMO}/fixed_labels.nii.gz", label=True)
    ml = load_image(f"{DEMO}/moving_labels.nii.gz", label=True)
    labels = shared_labels(fl.array, ml.array)
    rows = []
    for name in args.methods.split(","):
        if name == "ants-syn":
            from avsm.baselines.ants import ants_syn, warmup

            warmup()
            t = time.perf_counter()
            r = ants_syn(fixed, moving)
            call = "antspyx ants.registration(type_of_transform='SyN')"
        else:
            t = time.perf_counter()
            r = register(fixed=fixed, moving=moving, settings=preset(name, method="opt"), progress=False)
            call = f"avsm register --method opt --preset {name}"
        t = time.perf_counter() - t
        d = mean_dice(dice_per_label(r.warp(ml, mode="nearest").array, fl.array, labels=labels))
        rows.append((name, call, d, t))
    ref = next((t for n, _, _, t in rows if n == "ants-syn"), None)
    sys.stdout.write(f"demo pair {fixed.grid.shape} at {fixed.grid.spacing} mm, {args.threads} threads\n\n"
                     "| method | call | Dice | registration s | ÷ SyN |\n|---|---|---|---|---|\n")
    for n, call, d, t in rows:
        sys.stdout.write(f"| {n} | `{call}` | {d:.4f} | {t:.1f} | {t / ref:.2f} |\n" if ref else
                         f"| {n} | `{call}` | {d:.4f} | {t:.1f} | |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
