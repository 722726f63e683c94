"""Global similarity losses (lower is better): NCC and MSE, plus a factory by name.

Every loss here (and :class:`~avsm.losses.lncc.MKLNCC`,
:class:`~avsm.losses.mi.MutualInformation`) is called as
``loss(warped, fixed, weight=None)``: ``weight`` is an optional ``(B, 1, D, H, W)``
voxel weight in [0, 1] on the fixed grid (the fixed mask times the moving mask
warped into the fixed grid, built by the caller).  With a weight, voxel sums
become weighted sums, so voxels of weight 0 influence neither the loss nor its
gradient; ``weight=None`` is the unmasked loss, computed exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from avsm.losses.lncc import MKLNCC, expand_weight
from avsm.losses.mi import MutualInformation


class NCC(nn.Module):
    """Global normalised cross-correlation loss ``1 − ncc`` per item, averaged over the batch.

    Inputs ``(B, C, D, H, W)``; 0 for images equal up to ``a·I + b`` with ``a > 0``.
    With ``weight``, means and sums are weighted (an empty mask gives 1).
    Computed in float32.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss; ``weight``: optional ``(B, 1, D, H, W)`` in [0, 1]."""
        if weight is not None:
            return self._weighted(warped, fixed, weight)
        a = warped.flatten(1).float()
        b = fixed.flatten(1).float()
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        ncc = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + self.eps)
        return (1.0 - ncc).mean()

    def _weighted(self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if warped.shape != fixed.shape:
            raise ValueError(f"shapes differ: {tuple(warped.shape)} vs {tuple(fixed.shape)}")
        a = warped.flatten(1).float()
        b = fixed.flatten(1).float()
        w = expand_weight(weight, warped.float()).flatten(1)
        sw = w.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        a = a - (w * a).sum(1, keepdim=True) / sw
        b = b - (w * b).sum(1, keepdim=True) / sw
        wa = w * a
        ncc = (wa * b).sum(1) / torch.sqrt((wa * a).sum(1) * (w * b * b).sum(1) + self.eps)
        return (1.0 - ncc).mean()


class MSE(nn.Module):
    """Mean squared error over voxels, averaged over the batch (computed in float32).

    With ``weight``: per item ``Σ w (I − J)² / Σ w`` (over channels too), then the
    batch mean (an empty mask gives 0).
    """

    def forward(
        self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss; ``weight``: optional ``(B, 1, D, H, W)`` in [0, 1]."""
        if weight is None:
            return ((warped.float() - fixed.float()) ** 2).mean()
        if warped.shape != fixed.shape:
            raise ValueError(f"shapes differ: {tuple(warped.shape)} vs {tuple(fixed.shape)}")
        a, b = warped.float(), fixed.float()
        w = expand_weight(weight, a).flatten(1)
        sq = (w * (a - b).flatten(1) ** 2).sum(1)
        return (sq / w.sum(1).clamp_min(torch.finfo(a.dtype).tiny)).mean()


def similarity(name: str) -> nn.Module:
    """Similarity loss by name: ``lncc`` (mk-LNCC), ``ncc``, ``mse`` or ``mi`` (Mattes-style MI).

    The module's forward is ``(warped, fixed, weight=None)``.  ``mi`` samples
    :data:`MI_SAMPLES` voxels per evaluation, redrawn each time (as Mattes MI in
    ITK/ANTs samples a share of the voxels): on a 2 mm brain this is about 8 % of the
    grid and 10× cheaper than all voxels.
    """
    table: dict[str, type[nn.Module]] = {"lncc": MKLNCC, "ncc": NCC, "mse": MSE, "mi": MutualInformation}
    if name not in table:
        raise ValueError(f"unknown similarity {name!r}; choose from {sorted(table)}")
    if name == "mi":
        return MutualInformation(samples=MI_SAMPLES)
    return table[name]()


#: voxels sampled per evaluation by ``similarity("mi")``
MI_SAMPLES = 100_000
