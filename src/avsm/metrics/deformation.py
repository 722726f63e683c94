"""Regularity of a transformation: physical det J, folds and SDlogJ.

All functions take **world maps**: ``(1, 3, *grid.shape)`` tensors holding, for
every voxel of ``grid``, the world point (LPS, mm) it maps to (as returned by
:meth:`avsm.api.RegistrationResult.world_map`).  Derivatives are central
differences (one-sided at the border) of the true 3x3 Jacobian, so ``det J`` is
the physical volume ratio target/source and ``det J < 0`` marks a fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avsm.transform import world_jacobian_determinant

__all__ = ["FoldStats", "world_jacobian_determinant", "fold_stats", "sd_log_jacobian"]


@dataclass(frozen=True)
class FoldStats:
    """Folds of a map.

    Attributes:
        count: number of voxels with ``det J < 0``.
        fraction: ``count`` divided by the number of voxels considered (0..1).
        total: number of voxels considered.
    """

    count: int
    fraction: float
    total: int


def _select(det: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    det = np.asarray(det, dtype=np.float64)
    if mask is None:
        return det.reshape(-1)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != det.shape:
        raise ValueError(f"mask shape {mask.shape} does not match det J shape {det.shape}")
    return det[mask]


def fold_stats(det: np.ndarray, mask: np.ndarray | None = None) -> FoldStats:
    """Count voxels with ``det J < 0``.

    Args:
        det: det J array of any shape.
        mask: optional boolean array (same shape) restricting the voxels counted.

    Returns:
        :class:`FoldStats` (``fraction`` is ``nan`` for an empty selection).
    """
    d = _select(det, mask)
    n = int(np.count_nonzero(d < 0))
    return FoldStats(n, float(n / d.size) if d.size else float("nan"), int(d.size))


def sd_log_jacobian(det: np.ndarray, mask: np.ndarray | None = None, clip: float = 1e-9) -> float:
    """Standard deviation of ``log(det J)``, with ``det J`` clipped to ``[clip, 1/clip]``.

    Folded voxels (``det J <= 0``) therefore enter as ``log(clip)`` (the common
    convention of the Learn2Reg challenge, which uses ``clip = 1e-9``).

    Args:
        det: det J array of any shape (physical, dimensionless).
        mask: optional boolean array restricting the voxels.
        clip: lower clip value (> 0).

    Returns:
        The standard deviation (dimensionless); ``0`` for a pure affine.
    """
    if not clip > 0:
        raise ValueError("clip must be positive")
    d = _select(det, mask)
    if d.size == 0:
        return float("nan")
    return float(np.std(np.log(np.clip(d, clip, 1.0 / clip))))
