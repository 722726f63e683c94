"""Mutual information loss from a differentiable Parzen-window joint histogram (Mattes-style).

For two images ``I`` (warped) and ``J`` (fixed) with intensities roughly in
[0, 1], each voxel ``x`` is placed in ``n`` bins (``bins``, default 32) with
cubic B-spline Parzen weights

    t(x) = 1 + (n − 3) · (I(x) − lo) / (hi − lo)         (continuous bin coordinate)
    a_b(x) = β³(t(x) − b),   b = 0 … n − 1,

and likewise ``c_b(x)`` for ``J``.  With voxel weights ``w`` (a mask, or 1),

    P(a, b) = Σ_x w(x) a_a(x) c_b(x) / Σ_x w(x),        p_I = Σ_b P,   p_J = Σ_a P,
    MI = H(p_I) + H(p_J) − H(P),                        NMI = (H(p_I) + H(p_J)) / H(P),

entropies in nats.  The loss is ``−MI`` (or ``−NMI``), lower is better.

Design choices:

* **Kernel: cubic B-spline, on both images.**  It has compact support (4
  bins), is C², and is a partition of unity (``Σ_b β³(t − b) = 1`` for
  ``t ∈ [1, n − 2]``), so every voxel puts exactly its weight into the
  histogram: ``P`` sums to 1 without renormalisation and its marginals are the
  images' own Parzen histograms.  Its standard deviation is ``1/√3`` bin, i.e.
  a kernel of about one bin width.  Mattes MI (ITK) uses it for the moving
  image and a zero-order box for the fixed one; using it for both makes the
  loss symmetric in ``(I, J)`` and differentiable in the fixed image too.
  A Gaussian would need truncation and renormalisation.
* **Bins**: ``n = 32`` by default; the image range spans ``n − 3`` bin widths
  (the outer bins only receive kernel tails, as ITK's two padding bins).
* **Range**: by default each image's own min/max (``intensity_range="minmax"``)
  per batch item, over the voxels of positive weight, **detached** (as ITK/ANTs
  compute it once from the images, not as part of the gradient).  All bins are
  used whatever the intensity spread, and MI is exactly invariant to
  ``a·I + b`` (``a ≠ 0``).  The gradient ignores the range's dependence on the
  two extreme voxels.  A fixed ``(lo, hi)``, e.g. ``(0.0, 1.0)``, makes the loss
  an exact, stationary function of the intensities; values outside are clamped
  to the end bins (zero gradient there).
* **Sampling**: ``samples=None`` uses every voxel; an ``int`` is a voxel count,
  a ``float`` in (0, 1] a fraction.  Samples are drawn uniformly without
  replacement, the same positions for every item of the batch, anew at every
  call, from ``generator`` (a ``torch.Generator``, for determinism) or the
  global RNG.  The range still comes from all voxels (of positive weight).
* **Masks**: ``weight`` multiplies each voxel's fixed-image row, so it enters the
  joint histogram as a voxel count; voxels of weight 0 change neither ``P``,
  the range, nor the gradient (their intensities must be finite).
* **Memory**: two ``(B, N, n)`` weight tensors and one batched matmul; the
  ``(N, n, n)`` per-voxel joint is never formed.
"""

from __future__ import annotations

import torch
from torch import nn

from avsm.losses.lncc import expand_weight


def bspline3(u: torch.Tensor) -> torch.Tensor:
    """Centred cubic B-spline ``β³(u)``, support ``|u| < 2``, ``β³(0) = 2/3`` (reference form)."""
    a = u.abs()
    p, q = (2.0 - a).clamp_min(0.0), (1.0 - a).clamp_min(0.0)
    return (p * p * p - 4.0 * q * q * q) / 6.0


def _range(x: torch.Tensor, w: torch.Tensor | None,
           intensity_range: str | tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item ``(lo, hi)``, each ``(B, 1)``, detached; ``x``, ``w``: ``(B, N)``."""
    B = x.shape[0]
    if intensity_range != "minmax":
        lo_v, hi_v = intensity_range
        lo = torch.full((B, 1), float(lo_v), dtype=x.dtype, device=x.device)
        return lo, torch.full_like(lo, float(hi_v))
    x = x.detach()
    if w is None:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    else:
        inside = w.detach() > 0
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        lo = torch.where(inside, x, inf).amin(1, keepdim=True)
        hi = torch.where(inside, x, -inf).amax(1, keepdim=True)
        empty = ~inside.any(1, keepdim=True)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
    return lo, hi


def _bin_coordinate(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Continuous bin coordinate ``t ∈ [1, bins − 2]`` of ``x`` ``(B, N)`` for range ``lo, hi`` ``(B, 1)``.

    A constant image (``hi = lo``) falls at ``t = 1``.
    """
    span = hi - lo
    ok = span > 0
    scale = torch.where(ok, (bins - 3) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(span))
    return (1.0 + (x - lo) * scale).clamp(1.0, bins - 2.0)


def _spline_taps(t: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 non-zero cubic B-spline weights of each coordinate ``t`` ``(B, N)`` and their bins.

    Returns ``(values, index)``, both ``(B, N, 4)``: bins ``⌊t⌋ − 1 … ⌊t⌋ + 2`` with
    weights ``β³(t − bin)``, which sum to 1.
    """
    fl = t.detach().floor().clamp_max(bins - 3.0)
    f = t - fl
    g = 1.0 - f
    f2 = f * f
    f3 = f2 * f
    vals = torch.stack(
        [g * g * g, 4.0 - 6.0 * f2 + 3.0 * f3, 1.0 + 3.0 * (f + f2 - f3), f3], dim=-1
    ) / 6.0
    index = fl.long().unsqueeze(-1) - 1 + torch.arange(4, device=t.device)
    return vals, index


def parzen_weights(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cubic B-spline bin weights of intensities ``x`` ``(B, N)`` for range ``lo, hi`` ``(B, 1)``.

    Returns ``(B, N, bins)``, row ``x`` equal to ``β³(t(x) − b)`` (times ``weight[x]`` if
    given, ``(B, N)``); unweighted rows sum to 1 (partition of unity).  Only the 4
    non-zero taps per voxel are computed, then scattered into the dense rows.
    """
    vals, index = _spline_taps(_bin_coordinate(x, lo, hi, bins), bins)
    if weight is not None:
        vals = vals * weight.unsqueeze(-1)
    dense = torch.zeros(*x.shape, bins, dtype=vals.dtype, device=vals.device)
    return dense.scatter_(-1, index, vals)


def entropy(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Shannon entropy ``−Σ p log p`` in nats over ``dims`` (empty bins contribute 0, with 0 gradient)."""
    pos = p > 0
    safe = torch.where(pos, p, torch.ones_like(p))
    return -torch.where(pos, p * safe.log(), torch.zeros_like(p)).sum(dims)


def joint_histogram(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    weight: torch.Tensor | None = None,
    bins: int = 32,
    intensity_range: str | tuple[float, float] = "minmax",
    samples: int | float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Parzen joint histogram ``P`` ``(B, bins, bins)`` (rows: ``warped``, columns: ``fixed``), sums to 1.

    Args:
        warped, fixed: ``(B, 1, D, H, W)`` images.
        weight: optional ``(B, 1, D, H, W)`` voxel weight in [0, 1].
        bins, intensity_range, samples, generator: see :class:`MutualInformation`.
    """
    if warped.shape != fixed.shape:
        raise ValueError(f"shapes differ: {tuple(warped.shape)} vs {tuple(fixed.shape)}")
    if warped.dim() != 5 or warped.shape[1] != 1:
        raise ValueError(f"mutual information needs (B, 1, D, H, W) inputs, got {tuple(warped.shape)}")
    if bins < 5:
        raise ValueError("bins must be at least 5")
    if not warped.is_floating_point() or warped.dtype in (torch.float16, torch.bfloat16):
        warped = warped.float()
    fixed = fixed.to(warped.dtype)
    a, b = warped.flatten(1), fixed.flatten(1)
    w = None if weight is None else expand_weight(weight, warped).flatten(1)
    lo_a, hi_a = _range(a, w, intensity_range)
    lo_b, hi_b = _range(b, w, intensity_range)
    N = a.shape[1]
    if samples is not None:
        n = _sample_count(samples, N)
        if n < N:
            dev = generator.device if generator is not None else a.device
            idx = torch.randperm(N, generator=generator, device=dev)[:n].to(a.device)
            a, b = a[:, idx], b[:, idx]
            w = None if w is None else w[:, idx]
    wa = parzen_weights(a, lo_a, hi_a, bins)
    wb = parzen_weights(b, lo_b, hi_b, bins, w)
    if w is None:
        total = torch.full((a.shape[0], 1, 1), float(a.shape[1]), dtype=a.dtype, device=a.device)
    else:
        total = w.sum(1).reshape(-1, 1, 1)
    joint = torch.bmm(wa.transpose(1, 2), wb)
    return joint / total.clamp_min(torch.finfo(total.dtype).tiny)


def _sample_count(samples: int | float, N: int) -> int:
    if isinstance(samples, bool):
        raise TypeError("samples must be an int count, a float fraction or None")
    if isinstance(samples, int):
        if samples < 1:
            raise ValueError("samples count must be >= 1")
        return min(samples, N)
    if isinstance(samples, float):
        if not 0.0 < samples <= 1.0:
            raise ValueError("samples fraction must lie in (0, 1]")
        return max(1, round(samples * N))
    raise TypeError("samples must be an int count, a float fraction or None")


def mutual_information(joint: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """MI ``H(p_I) + H(p_J) − H(P)`` in nats, or NMI ``(H(p_I) + H(p_J)) / H(P)``, per item ``(B,)``.

    ``joint``: ``(B, n, n)`` joint distribution summing to 1 (or 0 for an empty mask,
    which gives MI 0 and NMI 0).
    """
    h_a = entropy(joint.sum(2), (1,))
    h_b = entropy(joint.sum(1), (1,))
    h_ab = entropy(joint, (1, 2))
    if normalized:
        return (h_a + h_b) / h_ab.clamp_min(torch.finfo(h_ab.dtype).tiny)
    return h_a + h_b - h_ab


class MutualInformation(nn.Module):
    """Mattes-style mutual information loss ``−MI`` (or ``−NMI``), lower is better.

    Args:
        bins: number of histogram bins per image (>= 5); the intensity range spans
            ``bins − 3`` of them.
        normalized: use ``−NMI = −(H(I) + H(J)) / H(I, J)`` (in [−2, −1]) instead of ``−MI``.
        intensity_range: ``"minmax"`` (each image's own detached min/max over voxels
            of positive weight, per item) or a fixed ``(lo, hi)`` such as ``(0.0, 1.0)``.
        samples: ``None`` for all voxels, an ``int`` voxel count or a ``float``
            fraction in (0, 1]; redrawn at each call.
        generator: random generator for the samples (on the inputs' device or the CPU);
            ``None`` uses the global RNG.
        reduction: ``mean`` over the batch, or ``none`` for a per-item ``(B,)`` loss.

    Inputs are ``(B, 1, D, H, W)`` (a single channel; anything else raises), float32
    or float64, CPU or CUDA.  MI is in nats: ``log k`` for ``k`` equally likely,
    well-separated intensity levels of an image with itself, ≈ 0 for independent images.
    """

    def __init__(
        self,
        bins: int = 32,
        normalized: bool = False,
        intensity_range: str | tuple[float, float] = "minmax",
        samples: int | float | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if bins < 5:
            raise ValueError("bins must be at least 5")
        if reduction not in ("mean", "none"):
            raise ValueError("reduction must be 'mean' or 'none'")
        if isinstance(intensity_range, str):
            if intensity_range != "minmax":
                raise ValueError("intensity_range must be 'minmax' or (lo, hi) with hi > lo")
        else:
            lo, hi = intensity_range
            if not float(hi) > float(lo):
                raise ValueError("intensity_range must be 'minmax' or (lo, hi) with hi > lo")
            intensity_range = (float(lo), float(hi))
        if samples is not None:
            _sample_count(samples, 1 << 62)
        self.bins = bins
        self.normalized = normalized
        self.intensity_range = intensity_range
        self.samples = samples
        self.generator = generator
        self.reduction = reduction

    def forward(
        self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``−MI`` (nats) or ``−NMI`` between ``warped`` and ``fixed`` ``(B, 1, D, H, W)``.

        ``weight``: optional ``(B, 1, D, H, W)`` voxel weight in [0, 1] on the fixed grid,
        applied in the joint histogram.  Returns a scalar, or ``(B,)`` with ``reduction="none"``.
        """
        joint = joint_histogram(warped, fixed, weight, self.bins, self.intensity_range,
                                self.samples, self.generator)
        loss = -mutual_information(joint, self.normalized)
        return loss.mean() if self.reduction == "mean" else loss
