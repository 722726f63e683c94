"""Measure FFT vs separable spatial convolution for the multi-Gaussian smoother.

Run: python benchmarks/smoother_speed.py
"""
from __future__ import annotations

import logging
import time

import torch

from avsm.core.sampling import gaussian_blur
from avsm.core.smoothing import MultiGaussianSmoother

log = logging.getLogger("smoother_speed")


def _time(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    for shape in [(24, 28, 24), (32, 32, 32), (48, 56, 48), (64, 64, 64)]:
        sm = MultiGaussianSmoother(shape)
        m = torch.randn(1, 3, *shape)

        def spatial() -> torch.Tensor:
            return sum(w * gaussian_blur(m, [s * (n - 1) for n in shape])
                       for s, w in zip(sm.sigmas, sm.weights))

        tf = _time(lambda: sm(m))
        ts = _time(spatial)
        log.info("%-14s FFT %.4f s   spatial %.4f s   spatial/FFT %.1fx", shape, tf, ts, ts / tf)


if __name__ == "__main__":
    main()
