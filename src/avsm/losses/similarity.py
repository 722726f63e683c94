"""Global similarity losses (lower is better): NCC and MSE, plus a factory by name."""

from __future__ import annotations

import torch
from torch import nn

from avsm.losses.lncc import MKLNCC


class NCC(nn.Module):
    """Global normalised cross-correlation loss ``1 − ncc`` per item, averaged over the batch.

    Inputs ``(B, C, D, H, W)``; 0 for images equal up to ``a·I + b`` with ``a > 0``.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        a = warped.flatten(1).float()
        b = fixed.flatten(1).float()
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        ncc = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + self.eps)
        return (1.0 - ncc).mean()


class MSE(nn.Module):
    """Mean squared error over voxels, averaged over the batch."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return ((warped.float() - fixed.float()) ** 2).mean()


def similarity(name: str) -> nn.Module:
    """Similarity loss by name: ``lncc`` (mk-LNCC), ``ncc`` or ``mse``."""
    table = {"lncc": MKLNCC, "ncc": NCC, "mse": MSE}
    if name not in table:
        raise ValueError(f"unknown similarity {name!r}; choose from {sorted(table)}")
    return table[name]()
