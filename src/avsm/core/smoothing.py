"""Multi-Gaussian smoother ``K`` that turns a vector momentum into a velocity.

``v = K ⋆ m`` with ``K = Σ_i w_i G_{σ_i}``, σ_i given in **unit-domain**
units per axis (σ = 0.05 is 5 % of the field of view along each axis, so the
kernel is anisotropic in voxels when the grid is not cubic; this is the
paper's convention).  Default σ = (0.05, 0.10, 0.15, 0.20, 0.25), weights ∝ σ
and summing to 1.

Implementation choice (measured with ``benchmarks/smoother_speed.py``): the
multi-Gaussian kernel is not separable (it is a *sum* of separable kernels)
and its widest component spans most of the grid, so a spatial convolution
costs five separable 3-pass convolutions with up to ~1.5·N taps each.  The
FFT applies the whole kernel with one forward/inverse transform pair and one
product.  On 2 CPU cores the two were within about 1.2x of each other at
48³-64³ (FFT ahead), and the FFT was several times faster on odd small grids;
we use the FFT, padded to 2·3·5-smooth sizes.

Boundary handling: **zero padding** (a linear, not circular, convolution).
Each axis is padded to ``N + r`` with ``r`` the kernel radius (3σ_max, at most
N-1), which is exactly enough to stop the FFT's wrap-around from reaching the
domain.  So momentum outside the image is zero and the velocity decays
smoothly near the boundary.  The authors' code used a periodic FFT, which
lets momentum at one face push the opposite face; that has no physical
meaning for an image, so we do not do it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_SIGMAS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)


def _fast_len(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def default_weights(sigmas: Sequence[float]) -> tuple[float, ...]:
    """Weights proportional to σ, normalised to sum to 1."""
    total = float(sum(sigmas))
    return tuple(float(s) / total for s in sigmas)


class MultiGaussianSmoother(nn.Module):
    """FFT multi-Gaussian smoothing on a fixed grid.

    Args:
        shape: spatial shape (D, H, W) of the fields to smooth.
        sigmas: standard deviations in unit-domain units.
        weights: one weight per σ (default ∝ σ, sum 1).

    Call with ``(B, C, D, H, W)``; returns the same shape.
    """

    def __init__(
        self,
        shape: Sequence[int],
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.weights = tuple(float(w) for w in (weights if weights is not None else default_weights(sigmas)))
        if len(self.weights) != len(self.sigmas):
            raise ValueError("one weight per sigma is needed")
        sig_max = max(self.sigmas)
        self.radius = tuple(min(math.ceil(3.0 * sig_max * (n - 1)), n - 1) for n in self.shape)
        self.padded = tuple(_fast_len(n + r) for n, r in zip(self.shape, self.radius))
        self.register_buffer("kernel_ft", self._kernel_ft(), persistent=False)

    def _kernel_ft(self) -> torch.Tensor:
        kernel = torch.zeros(self.padded, dtype=torch.float64)
        offsets = []
        for n, L, r in zip(self.shape, self.padded, self.radius):
            o = torch.zeros(L, dtype=torch.float64)
            idx = torch.arange(L)
            # circular offsets: 0..r at the start, -r..-1 at the end, zero elsewhere
            o = torch.where(idx <= r, idx.double(), torch.where(idx >= L - r, (idx - L).double(),
                                                                  torch.full_like(o, float("nan"))))
            offsets.append((o, n))
        for s, w in zip(self.sigmas, self.weights):
            g1 = []
            for o, n in offsets:
                sv = s * max(n - 1, 1)  # sigma in voxels along this axis
                g = torch.exp(-0.5 * (o / sv) ** 2)
                g = torch.nan_to_num(g, nan=0.0)
                g1.append(g / g.sum())
            kernel += w * g1[0][:, None, None] * g1[1][None, :, None] * g1[2][None, None, :]
        return torch.fft.rfftn(kernel, dim=(0, 1, 2))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if tuple(m.shape[2:]) != self.shape:
            raise ValueError(f"smoother built for {self.shape}, got field of shape {tuple(m.shape[2:])}")
        kft = self.kernel_ft.to(device=m.device)
        kft = kft.to(torch.complex64 if m.dtype != torch.float64 else torch.complex128)
        mf = torch.fft.rfftn(m, s=self.padded, dim=(2, 3, 4))
        v = torch.fft.irfftn(mf * kft, s=self.padded, dim=(2, 3, 4))
        D, H, W = self.shape
        return v[:, :, :D, :H, :W].to(m.dtype)
