"""Where the time of vSVF-opt goes: one energy evaluation (forward + backward), split by stage.

Run: python benchmarks/profile_opt.py [--shape 96,112,96] [--threads 2]
Prints seconds per stage (smoother, RK4 advection, upsampling, warp, mk-LNCC, backward).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from avsm.core.coords import identity_map
from avsm.core.integrate import advect_map
from avsm.core.sampling import resample_map, warp
from avsm.losses.lncc import MKLNCC
from avsm.models.vsvf import VSVF

log = logging.getLogger("profile_opt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="96,112,96")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    vs = VSVF(shape)
    fixed = torch.rand(1, 1, *shape)
    moving = torch.rand(1, 1, *shape)
    m = (1e-3 * torch.randn(1, 3, *vs.low_shape)).requires_grad_(True)
    phi0 = identity_map(shape)
    sim = MKLNCC()
    stages: dict[str, float] = {}

    def tick(name: str, t0: float) -> float:
        t = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + t - t0
        return t

    for _ in range(args.reps + 1):
        t = time.perf_counter()
        v = vs.velocity(m)
        t = tick("smoother K*m", t)
        low = advect_map(resample_map(phi0, vs.low_shape), v, steps=vs.steps)
        t = tick("RK4 advection (10 steps)", t)
        phi = resample_map(low, shape)
        t = tick("upsample map", t)
        w = warp(moving, phi)
        t = tick("warp image", t)
        loss = sim(w, fixed) + 10 * vs.energy(m, v).sum()
        t = tick("mk-LNCC + energy", t)
        loss.backward()
        t = tick("backward (all stages)", t)
        m.grad = None
    total = sum(stages.values())
    log.info("vSVF energy evaluation at %s (momentum %s), %d threads, mean of %d:", shape, vs.low_shape,
             args.threads, args.reps + 1)
    for k, s in stages.items():
        log.info("  %-28s %7.3f s  %5.1f %%", k, s / (args.reps + 1), 100 * s / total)
    log.info("  %-28s %7.3f s", "total", total / (args.reps + 1))


if __name__ == "__main__":
    main()
