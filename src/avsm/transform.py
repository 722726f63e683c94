"""World-space view of a registration: the behaviour every result type shares.

A result (avsm's own :class:`avsm.api.RegistrationResult`, or a peer tool's
:class:`avsm.baselines.base.FieldResult`) only has to say where each voxel of a
grid maps to in world coordinates (:meth:`WorldMapTransform.world_map`, LPS
mm, pull-back: fixed-space point → moving-space point).  Warping volumes, unit
maps between grids and physical Jacobians are then computed here, once, so
every method is measured by the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from avsm.core.coords import affine_map, homogeneous_to_centred
from avsm.core.jacobian import jacobian_determinant
from avsm.core.sampling import warp
from avsm.io.geometry import Grid
from avsm.io.image import Volume


def apply_homogeneous(M: np.ndarray, pts: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 matrix to a point field ``(B, 3, ...)`` whose channels are coordinates."""
    Mt = torch.as_tensor(M, dtype=pts.dtype, device=pts.device)
    flat = pts.reshape(pts.shape[0], 3, -1)
    out = torch.einsum("ij,bjn->bin", Mt[:3, :3], flat) + Mt[:3, 3].view(1, 3, 1)
    return out.reshape(pts.shape)


def grid_affine_map(M: np.ndarray, shape: Sequence[int], *, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Dense ``(1, 3, *shape)`` map of a corner-origin homogeneous unit-coordinate matrix ``M`` (4x4)."""
    A, b = homogeneous_to_centred(torch.as_tensor(M, dtype=dtype, device=device).unsqueeze(0))
    return affine_map(A, b, shape)


def grid_world_points(grid: Grid) -> torch.Tensor:
    """World position (LPS mm) of every voxel of ``grid``: ``(1, 3, *grid.shape)`` float64."""
    return apply_homogeneous(grid.unit_to_world(), grid_affine_map(np.eye(4), grid.shape))


def world_jacobian_determinant(world_map: torch.Tensor, grid: Grid) -> np.ndarray:
    """Physical ``det J`` of a world map sampled on ``grid`` (true 3x3 determinant).

    Args:
        world_map: ``(1, 3, *grid.shape)`` world points (mm).
        grid: the grid the map is sampled on.

    Returns:
        ``grid.shape`` float64 array ``det(d target_world / d source_world)``; ``< 0`` is a fold.
    """
    if tuple(world_map.shape[2:]) != tuple(grid.shape) or tuple(world_map.shape[:2]) != (1, 3):
        raise ValueError(f"world map shape {tuple(world_map.shape)} does not match grid {grid.shape}")
    det_u = jacobian_determinant(world_map.double())[0].cpu().numpy()
    return det_u / float(np.linalg.det(grid.unit_to_world()[:3, :3]))


class WorldMapTransform:
    """Shared behaviour of registration results; subclasses implement :meth:`world_map`.

    Subclasses provide the attributes ``fixed_original`` and ``moving_original``
    (the two images' own grids).
    """

    fixed_original: Grid
    moving_original: Grid

    def world_map(self, grid: Grid | None = None, *, inverse: bool = False,
                  affine_only: bool = False) -> torch.Tensor:
        """World point each voxel of ``grid`` maps to, ``(1, 3, *grid.shape)`` float64."""
        raise NotImplementedError

    def unit_map(self, grid: Grid, target: Grid, *, inverse: bool = False,
                 affine_only: bool = False) -> torch.Tensor:
        """Map from ``grid``'s unit coordinates to ``target``'s unit coordinates, ``(1, 3, *grid.shape)``."""
        return apply_homogeneous(target.world_to_unit(),
                                 self.world_map(grid, inverse=inverse, affine_only=affine_only))

    def warp(self, volume: Volume, *, onto: Grid | None = None, inverse: bool = False,
             mode: str | None = None, affine_only: bool = False) -> Volume:
        """Warp a moving-space volume onto ``onto`` (default: the fixed image's own grid).

        ``volume`` may lie on any grid in the moving image's world (e.g. a label
        map of another resolution).  Label maps use the ``label`` mode (never
        invents labels, keeps the dtype) unless ``mode`` says otherwise.
        ``inverse=True`` warps a fixed-space volume into the moving space.
        """
        if onto is None:
            onto = self.moving_original if inverse else self.fixed_original
        mode = mode or ("label" if volume.is_label else "linear")
        u = self.unit_map(onto, volume.grid, inverse=inverse, affine_only=affine_only)
        arr = torch.from_numpy(np.ascontiguousarray(volume.array))[None, None]
        if mode == "linear":
            out = warp(arr.double(), u, mode="linear").float()
        else:
            out = warp(arr, u, mode=mode)  # type: ignore[arg-type]
        return Volume(out[0, 0].numpy(), onto, volume.path, volume.is_label)

    def jacobian_determinant(self, grid: Grid | None = None) -> np.ndarray:
        """Physical ``det J`` of the forward transform on ``grid`` (default: fixed's own grid)."""
        grid = grid or self.fixed_original
        return world_jacobian_determinant(self.world_map(grid), grid)
