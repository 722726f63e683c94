"""Soft Dice on warped one-hot label maps (the optional supervised term of network training).

Where a training pair has label maps of one protocol (synthesised pairs, the IXI DLMUSE
parcellations), the moving labels are turned into one-hot channels, pulled through the
predicted map by trilinear interpolation (differentiable in the map), and compared with the
fixed one-hot channels by the soft Dice coefficient (as SynthMorph and semi-supervised
VoxelMorph train).  Pairs with many labels (DLMUSE: ~150) use a random subset per step.
"""

from __future__ import annotations

import torch

from avsm.core.sampling import warp

__all__ = ["one_hot", "select_labels", "shared_labels", "soft_dice", "warped_dice_loss"]


def shared_labels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted non-zero label values present in both integer maps (1-D int64)."""
    ua = torch.unique(a)
    ub = torch.unique(b)
    common = ua[torch.isin(ua, ub)]
    return common[common != 0].to(torch.int64)


def select_labels(a: torch.Tensor, b: torch.Tensor, k: int, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """At most ``k`` of :func:`shared_labels` ``(a, b)``, drawn without replacement (all when fewer)."""
    common = shared_labels(a, b)
    if common.numel() <= k:
        return common
    idx = torch.randperm(common.numel(), generator=generator)[:k]
    return common[idx.sort().values]


def one_hot(labels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(1, K, D, H, W)`` float32 indicator of each of ``values`` (K,) in ``labels`` ``(1, 1, D, H, W)``."""
    v = values.to(labels.device).view(1, -1, 1, 1, 1)
    return (labels.to(torch.int64) == v).float()


def soft_dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel soft Dice ``2 Σ p t / (Σ p + Σ t)`` of ``(B, K, ...)`` tensors → ``(B, K)``."""
    dims = tuple(range(2, pred.dim()))
    inter = (pred * target).sum(dims)
    return (2.0 * inter + eps) / (pred.sum(dims) + target.sum(dims) + eps)


def warped_dice_loss(moving_labels: torch.Tensor, fixed_labels: torch.Tensor, phi: torch.Tensor,
                     k: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """``1 − mean soft Dice`` of the moving labels pulled through ``phi`` against the fixed labels.

    Args:
        moving_labels: ``(B, 1, d, h, w)`` integer labels on the moving grid.
        fixed_labels: ``(B, 1, D, H, W)`` integer labels on the fixed grid (same protocol).
        phi: ``(B, 3, D, H, W)`` map, fixed grid → moving unit coordinates.
        k: labels per pair (a random subset of the shared ones when there are more).
        generator: randomness of the subset.

    Returns:
        Scalar: the mean over pairs of ``1 −`` the mean Dice over the chosen labels; a pair
        without shared labels contributes 0 (and no gradient).
    """
    losses = []
    for i in range(phi.shape[0]):
        values = select_labels(moving_labels[i], fixed_labels[i], k, generator)
        if values.numel() == 0:
            losses.append(phi.new_zeros(()))
            continue
        moved = warp(one_hot(moving_labels[i:i + 1], values).to(phi.dtype), phi[i:i + 1])
        target = one_hot(fixed_labels[i:i + 1], values).to(phi.dtype)
        losses.append(1.0 - soft_dice(moved, target).mean())
    return torch.stack(losses).mean()
