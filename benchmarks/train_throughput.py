#!/usr/bin/env python
"""Training throughput of AVSM: seconds per optimiser step for each stage.

Synthetic random pairs (no data needed), symmetric losses as in training.
Prints one JSON line per setting (stdout, via logging to keep the package's
no-print rule).

Usage::

    PYTHONPATH=src python benchmarks/train_throughput.py --shape 64 80 64 --threads 2 --iters 3
    PYTHONPATH=src python benchmarks/train_throughput.py --device cuda --shape 80 192 192
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from avsm.models.avsm import AVSM, AVSMConfig

log = logging.getLogger("train_throughput")


def bench(shape: tuple[int, int, int], stage: str, steps: int, iters: int, device: torch.device,
          base: int, symmetric: bool) -> dict[str, object]:
    """Mean seconds per step (after one warm-up step) of ``stage`` with ``steps`` steps."""
    torch.manual_seed(0)
    model = AVSM(AVSMConfig(affine_base=base, unet_base=base)).to(device)
    if stage == "vsvf":
        model.freeze_affine(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    m = torch.rand(1, 1, *shape, device=device)
    f = torch.rand(1, 1, *shape, device=device)
    kw = {"affine_steps": steps} if stage == "affine" else {"vsvf_steps": steps}
    times = []
    for i in range(iters + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model.training_loss(m, f, stage=stage, symmetric=symmetric, **kw)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    return {"stage": stage, "steps": steps, "shape": list(shape), "symmetric": symmetric,
            "device": str(device), "threads": torch.get_num_threads(),
            "sec_per_step": sum(times) / len(times), "min": min(times)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark grid."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 80, 64])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--base", type=int, default=8)
    p.add_argument("--no-symmetric", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    for stage, steps in (("affine", 1), ("affine", 3), ("vsvf", 1), ("vsvf", 2)):
        rec = bench(tuple(args.shape), stage, steps, args.iters, dev, args.base,  # type: ignore[arg-type]
                    not args.no_symmetric)
        log.info(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
