"""The vSVF network against its teacher on pre-aligned held-out IXI pairs.

The validation pairs of the pre-aligned training (:func:`avsm.train.mixture.build_validation` with
``prealigned=True``: 12 pairs of held-out IXI validation subjects, aligned by composed template
affines, no augmentation) registered by:

* ``none``: the pre-alignment alone;
* ``net:<file>``: the network's vSVF steps (affine steps 0), for each weights file given;
* ``vsvf-opt``: the distillation teacher (:func:`avsm.train.prealign.distillation_target`, the
  network's kernel and integrator on its grid).

Dice: mean over the labels of the DLMUSE parcellations present in both (nearest-neighbour warp),
on the network's ~4 mm grid.  Prints a table and writes ``--out`` (JSON).

Usage::

    python benchmarks/prealigned_validation.py --data-dir ../shared/data --cache runs/prealigned/cache \\
        --weights src/avsm/data/weights/avsm_brain.pt runs/prealigned/distill/best.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--cache", default="runs/prealigned/cache")
    ap.add_argument("--weights", nargs="+", default=[])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--spacing", type=float, default=4.2)
    ap.add_argument("--no-opt", action="store_true", help="skip the vSVF-opt teacher")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "training", "prealigned_validation.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from avsm.core.sampling import warp
    from avsm.metrics.overlap import dice_per_label
    from avsm.train.mixture import build_validation
    from avsm.train.prealign import distillation_config, distillation_target
    from avsm.train.trainer import load_model_file

    val = build_validation(args.data_dir, args.spacing, args.pairs, cache=args.cache, prealigned=True)

    def dice(phi: torch.Tensor | None, item: dict) -> float:
        lab = item["moving_labels"][None]
        if phi is not None:
            lab = warp(lab, phi, mode="nearest")
        s = dice_per_label(lab[0, 0].numpy(), item["fixed_labels"][0].numpy())
        return float(np.nanmean(list(s.values())))

    rows: dict[str, dict[str, float]] = {"none": {"dice": float(np.mean([dice(None, it) for it in val])),
                                                 "seconds": 0.0}}
    models = [(f"net:{w}", load_model_file(w)) for w in args.weights]
    for name, model in models:
        model.eval()
        ds, ts = [], []
        for it in val:
            t = time.perf_counter()
            with torch.no_grad():
                out = model(it["moving"][None], it["fixed"][None], affine_steps=0)
            ts.append(time.perf_counter() - t)
            ds.append(dice(out.phi, it))
        rows[name] = {"dice": float(np.mean(ds)), "seconds": float(np.mean(ts)), "per_pair": ds}
    if not args.no_opt and models:
        cfg = distillation_config(models[0][1].config)
        ds, ts = [], []
        for it in val:
            t = time.perf_counter()
            _, phi = distillation_target(it["moving"][None], it["fixed"][None], cfg)
            ts.append(time.perf_counter() - t)
            ds.append(dice(phi, it))
        rows["vsvf-opt (teacher)"] = {"dice": float(np.mean(ds)), "seconds": float(np.mean(ts)), "per_pair": ds}
    print("| method | Dice | s/pair |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['dice']:.3f} | {r['seconds']:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"pairs": len(val), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
