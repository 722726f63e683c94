"""Where the time of vSVF-opt goes.

Two parts, one run:

1. one energy evaluation (forward + backward) at a working-grid shape, split by
   stage, for each integrator (``rk4``: the paper's 10 RK4 steps of the transport
   equation; ``ss``: scaling and squaring, 7 squarings);
2. with ``--data-dir``, a whole ``opt`` registration of a real 2 mm pair
   (Colin27 → MNI 2009c) per preset, with the time of each stage and level and the
   number of energy evaluations;
3. with ``--native``, one evaluation at each level of the ``native`` preset's pyramid of a
   1 mm brain (256x256x160: 4, 2 and 1 mm), with its kernel, windows and momentum grid, mk-LNCC
   box sums by cumulative sums (the preset's) and by the strided conv (the previous default).

Run: ``PYTHONPATH=src python benchmarks/profile_opt.py [--shape 96,112,96] [--threads 2]
[--data-dir ../shared/data] [--native]``
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from avsm.core.coords import identity_map
from avsm.core.sampling import warp
from avsm.losses.lncc import MKLNCC
from avsm.models.vsvf import VSVF, low_res_shape
from avsm.optim.vsvf_opt import VSVFOptConfig, build_similarity

log = logging.getLogger("profile_opt")


def profile_evaluation(shape: tuple[int, int, int], integrator: str, reps: int, device: str,
                       config: VSVFOptConfig | None = None, box: str | None = None) -> dict[str, float]:
    """Seconds per stage of one energy evaluation (mean of ``reps`` after one warm-up).

    ``config``: kernel, windows and momentum grid of a preset's vSVF stage (default: the
    paper's); ``box``: force the mk-LNCC box sum (``conv`` or ``cumsum``).
    """
    if config is None:
        vs = VSVF(shape, method=integrator).to(device)
        sim = MKLNCC(box=box or "conv")
    else:
        vs = VSVF(shape, low_res_shape(shape, config.low_res_factor), sigmas=config.sigmas,
                  method=config.integrator, squarings=config.squarings, steps=config.time_steps).to(device)
        sim = build_similarity(config.similarity, config.lncc_windows)
        if box is not None and isinstance(sim, MKLNCC):
            sim.box = box
    fixed = torch.rand(1, 1, *shape, device=device)
    moving = torch.rand(1, 1, *shape, device=device)
    m = (1e-3 * torch.randn(1, 3, *vs.low_shape, device=device)).requires_grad_(True)
    phi0 = identity_map(shape, device=device)
    stages: dict[str, float] = {}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def tick(name: str, t0: float) -> float:
        sync()
        t = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + t - t0
        return t

    for rep in range(reps + 1):
        if rep == 1:
            stages.clear()
        sync()
        t = time.perf_counter()
        v = vs.velocity(m)
        t = tick("smoother K*m", t)
        step = vs(m, phi0)  # includes the smoother again; subtracted below
        t = tick("map (integrator + up-sampling)", t)
        w = warp(moving, step.phi)
        t = tick("warp image", t)
        loss = sim(w, fixed) + 10 * vs.energy(m, v).sum()
        t = tick("mk-LNCC + energy", t)
        loss.backward()
        t = tick("backward (all stages)", t)
        m.grad = None
    stages["map (integrator + up-sampling)"] -= stages["smoother K*m"]
    return {k: s / reps for k, s in stages.items()}


def profile_registration(data_dir: str, name: str, threads: int) -> None:
    """A whole ``opt`` registration of Colin27 → MNI 2009c at 2 mm with one preset."""
    from avsm.api import register
    from avsm.io.image import load_image
    from avsm.settings import preset

    fixed = load_image(os.path.join(data_dir, "mni2009c_brain.nii.gz"))
    moving = load_image(os.path.join(data_dir, "colin27_brain.nii.gz"))
    s = preset(name, method="opt")
    t0 = time.perf_counter()
    res = register(fixed=fixed, moving=moving, settings=s, progress=False)
    total = time.perf_counter() - t0
    log.info("preset %-5s whole opt registration %.1f s (%d threads): %s", name, total, threads,
             ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items() if k != "total"))
    log.info("               vSVF levels %s: evaluations %s, seconds %s", s.vsvf.scales,
             res.info.get("vsvf_evaluations"), res.info.get("vsvf_level_seconds"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="96,112,96")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default=None, help="also profile whole registrations of a real pair")
    ap.add_argument("--presets", default="native,fast,paper")
    ap.add_argument("--native", action="store_true",
                    help="profile the native preset's levels of a 1 mm brain (256x256x160)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    for integrator in (() if args.native else ("rk4", "ss")):
        stages = profile_evaluation(shape, integrator, args.reps, args.device)  # type: ignore[arg-type]
        total = sum(stages.values())
        log.info("vSVF energy evaluation at %s, integrator %s, %s, %d threads, mean of %d:", shape, integrator,
                 args.device, args.threads, args.reps)
        for k, s in stages.items():
            log.info("  %-32s %7.3f s  %5.1f %%", k, s, 100 * s / total)
        log.info("  %-32s %7.3f s", "total", total)
    if args.native:
        # the native preset's pyramid on a 1 mm brain (OASIS-TRT-20: 256x256x160): each level, with the
        # preset's kernel, windows and momentum grid, box sums by cumulative sums (the preset's) and by
        # the strided conv (the previous default); the 1 mm level is what a third level would cost
        from avsm.settings import preset

        cfg = preset("native").vsvf
        for scale in (0.25, 0.5, 1.0):
            lv = tuple(int(round(n * scale)) for n in (256, 256, 160))
            for box in ("cumsum", "conv"):
                if scale == 1.0 and box == "conv" and args.reps > 1:
                    continue  # about 30 s per evaluation
                stages = profile_evaluation(lv, cfg.integrator, 1 if scale == 1.0 else args.reps, args.device,
                                            config=cfg, box=box)
                total = sum(stages.values())
                log.info("native preset, level %s of 256x256x160 (%s), box sums %s: %.3f s per evaluation (%s)",
                         scale, "x".join(map(str, lv)), box, total,
                         ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    if args.data_dir:
        for name in args.presets.split(","):
            profile_registration(args.data_dir, name, args.threads)


if __name__ == "__main__":
    main()
