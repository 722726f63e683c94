"""Issue 18's one-minute check: how much does the affine regulariser λ‖Δ‖² cost affine-opt on real pairs?

Affine-opt (Adam, mk-LNCC, the network's 4.2 mm grid, from the automatic initialisation) with the
training loss's penalty ``λ (‖A − A0‖²_F + ‖b − b0‖²)`` added, for λ ∈ {0, 0.025, 0.1, 1, 8} (0.025:
where the template run's schedule ended; 8 → 1.1: what the IXI fine-tune ran with before the
schedule was carried over ``--init-from``), on ten IXI *training* pairs (consecutive training
subjects, never validation or test).  Reports the affine-only Dice of the DLMUSE labels (labels
present in both, warped nearest on the working grid) per λ, the distance moved from the start
and the similarity.

Usage::

    python benchmarks/lambda_ar_check.py --data-dir ../shared/data [--pairs 10 --iterations 150]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from avsm.api import initialise, prepare_pair  # noqa: E402
from avsm.core.coords import affine_map  # noqa: E402
from avsm.core.sampling import warp  # noqa: E402
from avsm.io.image import load_image, resample  # noqa: E402
from avsm.losses.lncc import MKLNCC  # noqa: E402
from avsm.train.cohort import ixi_subjects, split_subjects  # noqa: E402

LAMBDAS = (0.0, 0.025, 0.1, 1.0, 8.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    labs = np.intersect1d(np.unique(a), np.unique(b))
    labs = labs[labs != 0]
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labs]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--spacing", type=float, default=4.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    train, _ = split_subjects([s for s in ixi_subjects(os.path.join(args.data_dir, "ixi185")) if s.labels])
    subs = train[: 2 * args.pairs]
    sim = MKLNCC()
    rows: dict[float, list[tuple[float, float, float]]] = {lam: [] for lam in LAMBDAS}
    base = []
    t0 = time.time()
    for k in range(args.pairs):
        fs, ms = subs[2 * k], subs[2 * k + 1]
        F, M = load_image(fs.image), load_image(ms.image)
        FL, ML = load_image(fs.labels, label=True), load_image(ms.labels, label=True)  # type: ignore[arg-type]
        pair = prepare_pair(F, M, spacing=args.spacing)
        flab = resample(FL, pair.fixed_grid, interpolation="nearest").array
        mlab = torch.from_numpy(resample(ML, pair.moving_grid, interpolation="nearest").array.astype(np.float32))[None, None]
        A0, b0, _ = initialise(pair, "auto")
        shape = pair.fixed_grid.shape
        base.append(dice(warp(mlab, affine_map(A0, b0, shape), mode="nearest")[0, 0].numpy(), flab))
        for lam in LAMBDAS:
            A = A0.clone().requires_grad_(True)
            b = b0.clone().requires_grad_(True)
            opt = torch.optim.Adam([A, b], lr=1e-2)
            for _ in range(args.iterations):
                opt.zero_grad()
                s = sim(warp(pair.moving_t, affine_map(A, b, shape)), pair.fixed_t)
                dev = ((A - A0) ** 2).sum() + ((b - b0) ** 2).sum()
                (s + lam * dev).backward()
                opt.step()
            with torch.no_grad():
                phi = affine_map(A, b, shape)
                d = dice(warp(mlab, phi, mode="nearest")[0, 0].numpy(), flab)
                rows[lam].append((d, float(dev), float(sim(warp(pair.moving_t, phi), pair.fixed_t))))
        print(f"pair {k} ({ms.id} -> {fs.id}): init {base[-1]:.3f} "
              + " ".join(f"λ={lam:g}: {rows[lam][-1][0]:.3f}" for lam in LAMBDAS), flush=True)
    print(f"\n{args.pairs} IXI training pairs at {args.spacing} mm, Adam {args.iterations} iterations "
          f"(lr 1e-2), {time.time() - t0:.0f} s\n")
    print("| λ | affine-only Dice | Δ vs λ=0 (min, mean) | ‖Δ‖² moved | mk-LNCC |")
    print("|---|---|---|---|---|")
    print(f"| initialisation | {np.mean(base):.3f} | | 0 | |")
    ref = np.array([r[0] for r in rows[0.0]])
    for lam in LAMBDAS:
        d = np.array([r[0] for r in rows[lam]])
        print(f"| {lam:g} | {d.mean():.3f} | {np.min(d - ref):+.3f}, {np.mean(d - ref):+.3f} | "
              f"{np.mean([r[1] for r in rows[lam]]):.4f} | {np.mean([r[2] for r in rows[lam]]):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
