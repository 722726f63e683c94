"""Jacobian of a map, its true 3x3 determinant, and fold counts.

Derivatives are taken with respect to the *unit* coordinates of the map's own
grid (central differences inside, one-sided at the border).  The determinant
is then the local volume ratio between the two unit cubes; scale it by
``det(M_moving) / det(M_fixed)`` (the linear parts of the unit-to-world
matrices, see :mod:`avsm.io.geometry`) for a physical volume ratio.  Folds
(``det J < 0``) do not depend on that positive scale, as long as both images
have the same handedness.
"""

from __future__ import annotations

import torch

from avsm.core.integrate import map_gradient


def jacobian(phi: torch.Tensor) -> torch.Tensor:
    """Jacobian matrix field of a map.

    Args:
        phi: ``(B, 3, D, H, W)`` map in unit coordinates.

    Returns:
        ``(B, 3, 3, D, H, W)`` with ``J[:, i, j] = d phi_i / d x_j`` (unit coordinates).
    """
    if phi.dim() != 5 or phi.shape[1] != 3:
        raise ValueError(f"map must have shape (B, 3, D, H, W), got {tuple(phi.shape)}")
    if min(phi.shape[2:]) < 2:
        raise ValueError("the Jacobian needs at least 2 voxels along every axis")
    return torch.stack(map_gradient(phi), dim=2)


def det3(J: torch.Tensor) -> torch.Tensor:
    """True determinant of a field of 3x3 matrices ``(B, 3, 3, ...)`` -> ``(B, ...)``."""
    a, b, c = J[:, 0, 0], J[:, 0, 1], J[:, 0, 2]
    d, e, f = J[:, 1, 0], J[:, 1, 1], J[:, 1, 2]
    g, h, i = J[:, 2, 0], J[:, 2, 1], J[:, 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_determinant(phi: torch.Tensor) -> torch.Tensor:
    """``det J`` of a map: ``(B, 3, D, H, W)`` -> ``(B, D, H, W)``."""
    return det3(jacobian(phi))


def count_folds_in_slabs(phi: torch.Tensor, slab: int = 16) -> int:
    """Voxels with ``det J < 0`` of one map ``(1, 3, D, H, W)``, computed ``slab`` slices at a time.

    Each slab is differentiated with a one-slice halo, so every slice gets the same central (or
    border one-sided) differences as the whole map; only the unit step along D differs (the
    slab's own), which scales ``det J`` by a positive factor and leaves its sign unchanged.
    Peak memory: a few slabs in float64 instead of the whole Jacobian (9 fields).
    """
    D = phi.shape[2]
    total = 0
    for z0 in range(0, D, slab):
        z1 = min(z0 + slab, D)
        a, b = max(z0 - 1, 0), min(z1 + 1, D)
        det = jacobian_determinant(phi[:, :, a:b].double())[:, z0 - a:z1 - a]
        total += int((det < 0).sum())
    return total


def count_folds(phi: torch.Tensor) -> torch.Tensor:
    """Number of voxels with ``det J < 0`` per batch item: ``(B,)`` int64."""
    return (jacobian_determinant(phi) < 0).flatten(1).sum(1)
