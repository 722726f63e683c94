"""Inverse consistency of a pair of registrations run in both directions (AVSM paper, Sec. 5).

For a registration ``A -> B`` (fixed A, moving B; pull-back world map ``Φ_AB``:
A-world → B-world) and the independent registration ``B -> A`` (``Φ_BA``), the
composition ``Φ_BA ∘ Φ_AB`` should be the identity of A's world.  The measure is

    ln( (1/|V|) Σ_{x ∈ V} ‖Φ_BA(Φ_AB(x)) − x‖² )     [ln of mm²]

over the voxels ``V`` of the fixed grid at least ``border`` voxels away from
its faces.  Lower is better; an exact inverse pair gives ``-inf`` (or a very
low value from round-off).

Works for any object with ``world_map(grid, inverse=False)`` returning
``(1, 3, *grid.shape)`` float64 world points: :class:`avsm.api.RegistrationResult`
and every baseline result (:mod:`avsm.baselines.base`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from avsm.core.sampling import warp
from avsm.io.geometry import Grid
from avsm.transform import apply_homogeneous, grid_world_points

__all__ = ["interpolate_world_map", "inverse_consistency_error", "inverse_consistency"]


def interpolate_world_map(world_map: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Evaluate a world map at arbitrary world points (trilinear; displacement held constant outside).

    Args:
        world_map: ``(1, 3, *grid.shape)`` world points (mm) the voxels of ``grid`` map to.
        grid: grid the map is sampled on.
        points: ``(1, 3, ...)`` world points (LPS, mm) where to evaluate.

    Returns:
        ``(1, 3, ...)`` float64 world points.
    """
    wm = world_map.double()
    pts = points.double()
    spatial = pts.shape[2:]
    u = apply_homogeneous(grid.world_to_unit(), pts.reshape(1, 3, -1)).reshape(1, 3, -1, 1, 1)
    ident = grid_world_points(grid)
    disp = wm - ident
    d = warp(disp, u, mode="linear", padding="border")
    return (pts.reshape(1, 3, -1, 1, 1) + d).reshape(1, 3, *spatial)


def _interior(shape: tuple[int, ...], border: int) -> tuple[slice, ...]:
    sl = tuple(slice(border, n - border) for n in shape)
    if any(s.stop - s.start <= 0 for s in sl):
        raise ValueError(f"border {border} leaves no voxel of a grid of shape {shape}")
    return sl


def inverse_consistency_error(
    forward: Any,
    backward: Any,
    *,
    grid: Grid | None = None,
    backward_grid: Grid | None = None,
    border: int = 10,
) -> float:
    """Mean squared round-trip error ``(1/|V|) Σ ‖Φ_BA(Φ_AB(x)) − x‖²`` in mm².

    Args:
        forward: result of registering moving B to fixed A (``world_map`` on A's grids).
        backward: result of registering moving A to fixed B.
        grid: A's grid where the error is measured (default ``forward.fixed_original``).
        backward_grid: B's grid on which ``backward``'s map is sampled before
            interpolation (default ``backward.fixed_original``).
        border: voxels of ``grid`` ignored at each face.

    Returns:
        Mean squared distance in mm².
    """
    grid = grid or forward.fixed_original
    backward_grid = backward_grid or backward.fixed_original
    phi_ab = forward.world_map(grid).double()
    phi_ba = backward.world_map(backward_grid).double()
    sl = _interior(tuple(grid.shape), border)
    pts = phi_ab[(slice(None), slice(None)) + sl]
    round_trip = interpolate_world_map(phi_ba, backward_grid, pts)
    ident = grid_world_points(grid)[(slice(None), slice(None)) + sl]
    err = ((round_trip - ident) ** 2).sum(1)
    return float(err.mean())


def inverse_consistency(
    forward: Any,
    backward: Any,
    *,
    grid: Grid | None = None,
    backward_grid: Grid | None = None,
    border: int = 10,
) -> float:
    """The paper's measure: ``ln`` of :func:`inverse_consistency_error` (ln mm²; ``-inf`` if exact)."""
    e = inverse_consistency_error(forward, backward, grid=grid, backward_grid=backward_grid, border=border)
    return math.log(e) if e > 0 else float("-inf")
