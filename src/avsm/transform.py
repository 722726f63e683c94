"""World-space view of a registration: the behaviour every result type shares.

A result (avsm's own :class:`RegistrationResult`, or a peer tool's
:class:`avsm.baselines.base.FieldResult`) only has to say where each voxel of a
grid maps to in world coordinates (:meth:`WorldMapTransform.world_map`, LPS
mm, pull-back: fixed-space point → moving-space point).  Warping volumes, unit
maps between grids and physical Jacobians are then computed here, once, so
every method is measured by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avsm.core.coords import affine_map, homogeneous_to_centred, invert_affine
from avsm.core.jacobian import count_folds_in_slabs, jacobian_determinant
from avsm.core.sampling import (
    compose_displacement,
    label_indices,
    map_displacement,
    sample_affine,
    warp,
    warp_label_indices,
)
from avsm.io.geometry import Grid
from avsm.io.image import Volume
from avsm.models.vsvf import VelocityStep, replay, replay_inverse

#: voxels per slab when a map is evaluated on a large grid (a float64 point field of
#: one slab is ``24 * SLAB_VOXELS`` bytes, about 100 MB)
SLAB_VOXELS = 1 << 22


def slab_ranges(grid: Grid, voxels: int | None = None) -> list[tuple[int, int]]:
    """Ranges ``(z0, z1)`` of tensor-axis-0 slices covering ``grid``, about ``voxels`` voxels each.

    Every per-voxel result (warped image, displacement field, det J) is computed on
    :meth:`Grid.slab` sub-grids of these ranges, so memory grows with the slab,
    not with the image.
    """
    plane = grid.shape[1] * grid.shape[2]
    n = max(1, int(SLAB_VOXELS if voxels is None else voxels) // plane)
    return [(z, min(z + n, grid.shape[0])) for z in range(0, grid.shape[0], n)]


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


def grid_world_points(grid: Grid, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """World position (LPS mm) of every voxel of ``grid``: ``(1, 3, *grid.shape)`` (float64 or ``dtype``)."""
    return grid_affine_map(grid.unit_to_world(), grid.shape, dtype=dtype)


def world_jacobian_determinant(world_map: torch.Tensor, grid: Grid) -> np.ndarray:
    """Physical ``det J`` of a world map sampled on ``grid`` (true 3x3 determinant).

    Args:
        world_map: ``(1, 3, *grid.shape)`` world points (mm).
        grid: the grid the map is sampled on.

    Returns:
        ``grid.shape`` array (the map's float dtype) ``det(d target_world / d source_world)``;
        ``< 0`` is a fold.
    """
    if tuple(world_map.shape[2:]) != tuple(grid.shape) or tuple(world_map.shape[:2]) != (1, 3):
        raise ValueError(f"world map shape {tuple(world_map.shape)} does not match grid {grid.shape}")
    wm = world_map if world_map.dtype in (torch.float32, torch.float64) else world_map.double()
    det_u = jacobian_determinant(wm)[0].cpu().numpy()
    return det_u / float(np.linalg.det(grid.unit_to_world()[:3, :3]))


def _label_values(array: np.ndarray) -> list[int]:
    """Distinct values of an integer label array (by counting when the range is small: fast)."""
    lo, hi = int(array.min()), int(array.max())
    if np.issubdtype(array.dtype, np.integer) and hi - lo < 1 << 20:
        counts = np.bincount((array.reshape(-1) - lo).astype(np.intp, copy=False) if lo else
                             array.reshape(-1).astype(np.intp, copy=False), minlength=hi - lo + 1)
        return [int(v) + lo for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(array)]


class VolumeSampler:
    """Samples one volume at world points, piece by piece (label values and positions found once).

    Args:
        volume: any volume (its own grid).
        mode: ``linear`` (float32 output), ``nearest`` or ``label`` (dtype kept);
            default ``label`` for label maps, else ``linear``.
    """

    def __init__(self, volume: Volume, mode: str | None = None) -> None:
        self.volume = volume
        self.mode = mode or ("label" if volume.is_label else "linear")
        self.src = torch.from_numpy(np.ascontiguousarray(volume.array))[None, None]
        if self.mode == "linear":
            self.src = self.src.float()
        self.values = _label_values(volume.array) if self.mode == "label" else None
        self.dtype = self.src.dtype
        if self.values is not None:
            # label mode samples each voxel's position among the values (int16), found once
            self.src = label_indices(self.src, self.values)
        self.w2u = volume.grid.world_to_unit()

    def empty(self, shape: Sequence[int]) -> np.ndarray:
        """An uninitialised output array of ``shape`` with the output dtype."""
        return np.empty(tuple(shape), dtype=np.float32 if self.mode == "linear" else self.volume.array.dtype)

    def __call__(self, world: torch.Tensor) -> np.ndarray:
        """Values at world points ``(1, 3, *s)`` (LPS mm) → array of shape ``s`` (0 outside).

        Only the part of the volume that the points reach (plus one voxel) is read, so
        sampling a large volume piece by piece costs the pieces, not the volume.
        """
        u = apply_homogeneous(self.w2u, world)
        src, u = self._crop(u)
        if self.mode == "linear":
            out = warp(src, u.float(), mode="linear")
        elif self.values is not None:
            out = warp_label_indices(src, u, self.values, dtype=self.dtype)
        else:
            out = warp(src, u, mode=self.mode)  # type: ignore[arg-type]
        return out[0, 0].numpy()

    def _crop(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source cropped to the index box of the points ``u`` (unit coordinates), and ``u`` in the crop."""
        sizes = self.src.shape[2:]
        lo, hi, scale, shift = [], [], [], []
        for c, n in enumerate(sizes):
            if n < 2:
                lo.append(0), hi.append(n - 1), scale.append(1.0), shift.append(0.0)
                continue
            idx = u[:, c] * (n - 1)
            a = int(math.floor(float(idx.amin()))) - 1
            b = int(math.ceil(float(idx.amax()))) + 1
            a, b = max(0, min(a, n - 2)), min(n - 1, max(b, 1))
            if b - a < 1:
                a, b = max(0, b - 1), max(1, b)
            lo.append(a), hi.append(b)
            scale.append((n - 1) / (b - a))
            shift.append(a / (b - a))
        if all(a == 0 and b == n - 1 for a, b, n in zip(lo, hi, sizes)):
            return self.src, u
        src = self.src[:, :, lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
        sc = torch.tensor(scale, dtype=u.dtype).view(1, 3, *([1] * (u.dim() - 2)))
        sh = torch.tensor(shift, dtype=u.dtype).view(1, 3, *([1] * (u.dim() - 2)))
        return src, u * sc - sh


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
        The output is computed in slabs of ``onto`` (:func:`slab_ranges`); linear
        interpolation returns float32.
        """
        if onto is None:
            onto = self.moving_original if inverse else self.fixed_original
        sampler = VolumeSampler(volume, mode)
        out = sampler.empty(onto.shape)
        for z0, z1 in slab_ranges(onto):
            out[z0:z1] = sampler(self.world_map(onto.slab(z0, z1), inverse=inverse, affine_only=affine_only))
        return Volume(out, onto, volume.path, volume.is_label)

    def jacobian_determinant(self, grid: Grid | None = None) -> np.ndarray:
        """Physical ``det J`` of the forward transform on ``grid`` (default: fixed's own grid).

        Computed in slabs with a one-slice halo, so the values equal the whole-grid
        central differences exactly.

        Returns:
            ``grid.shape`` float32 array.
        """
        grid = grid or self.fixed_original
        D = grid.shape[0]
        out = np.empty(grid.shape, dtype=np.float32)
        for z0, z1 in slab_ranges(grid):
            a, b = max(z0 - 1, 0), min(z1 + 1, D)
            det = world_jacobian_determinant(self.world_map(grid.slab(a, b)), grid.slab(a, b))
            out[z0:z1] = det[z0 - a:z0 - a + (z1 - z0)]
        return out


@dataclass
class RegistrationResult(WorldMapTransform):
    """A registration between a fixed and a moving image, and how to use it.

    Attributes:
        fixed_grid, moving_grid: working grids of the two images.
        fixed_original, moving_original: the images' own grids.
        A, b: ``(1, 3, 3)``, ``(1, 3)`` final affine (fixed → moving working unit coordinates).
        phi: ``(1, 3, *fixed_grid.shape)`` forward map → moving working unit coordinates.
        phi_inv: ``(1, 3, *moving_grid.shape)`` inverse map → fixed working unit coordinates.
        phi_affine: ``(1, 3, *fixed_grid.shape)`` the affine stage alone.
        method: method name; ``timings``: seconds per stage; ``info``: extra records.
        steps: the vSVF steps after the affine, in order (velocities and integrators):
            ``phi`` and ``phi_inv`` are exactly :func:`avsm.models.vsvf.replay` of them, which is
            what the compact transform file stores (:mod:`avsm.export.compact`).
    """

    fixed_grid: Grid
    moving_grid: Grid
    fixed_original: Grid
    moving_original: Grid
    A: torch.Tensor
    b: torch.Tensor
    phi: torch.Tensor
    phi_inv: torch.Tensor
    phi_affine: torch.Tensor
    method: str
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    steps: list[VelocityStep] = field(default_factory=list)

    @classmethod
    def from_steps(cls, *, fixed_grid: Grid, moving_grid: Grid, fixed_original: Grid, moving_original: Grid,
                   A: torch.Tensor, b: torch.Tensor, steps: Sequence[VelocityStep], method: str,
                   timings: dict[str, float] | None = None, info: dict[str, Any] | None = None,
                   ) -> RegistrationResult:
        """The result defined by an affine ``(A, b)`` and vSVF ``steps``: its maps are regenerated here.

        Args:
            A, b: ``(1, 3, 3)``, ``(1, 3)`` affine (fixed → moving working unit coordinates).
            steps: recorded vSVF steps (velocities on low-resolution grids of ``fixed_grid``).
        """
        A = A.detach().cpu().float()
        b = b.detach().cpu().float()
        Ai, bi = invert_affine(A, b)
        phi_affine = affine_map(A, b, fixed_grid.shape)
        steps = [VelocityStep(st.v.detach().cpu().float(), st.method, st.steps, st.squarings) for st in steps]
        with torch.no_grad():
            phi = replay(phi_affine, steps, fixed_grid.shape)
            phi_inv = replay_inverse(affine_map(Ai, bi, moving_grid.shape), steps, fixed_grid.shape)
        out = cls(fixed_grid=fixed_grid, moving_grid=moving_grid, fixed_original=fixed_original,
                  moving_original=moving_original, A=A, b=b, phi=phi, phi_inv=phi_inv, phi_affine=phi_affine,
                  method=method, timings=dict(timings or {}), info=dict(info or {}), steps=list(steps))
        out.__dict__["_replayed"] = (phi, A, b)  # these maps are the steps' (see steps_error)
        return out

    def steps_error(self) -> float:
        """Largest difference (unit coordinates) between ``phi`` and the replay of ``A, b, steps``.

        0 without replaying when ``phi``, ``A`` and ``b`` are still the ones :meth:`from_steps` made.
        """
        made = self.__dict__.get("_replayed")
        if made is not None and all(x is y for x, y in zip(made, (self.phi, self.A, self.b))):
            return 0.0
        check = RegistrationResult.from_steps(
            fixed_grid=self.fixed_grid, moving_grid=self.moving_grid, fixed_original=self.fixed_original,
            moving_original=self.moving_original, A=self.A, b=self.b, steps=self.steps, method=self.method)
        return float((check.phi - self.phi.float()).abs().max())

    def world_map(self, grid: Grid | None = None, *, inverse: bool = False,
                  affine_only: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """World (LPS mm) point that each voxel of ``grid`` maps to, ``(1, 3, *grid.shape)`` (float64,
        or ``dtype``: float32 halves the cost of large outputs at about 3e-5 mm resolution).

        Forward: ``grid`` is in the fixed image's space (default: the fixed image's
        own grid) and the values are points in the moving image.  ``inverse``
        swaps the roles (default grid: the moving image's own grid).
        """
        src, dst = (self.moving_grid, self.fixed_grid) if inverse else (self.fixed_grid, self.moving_grid)
        if grid is None:
            grid = self.moving_original if inverse else self.fixed_original
        to_src = src.world_to_unit() @ grid.unit_to_world()
        # world = U2W(inner + disp(inner)) = U2W(inner) + D(inner), D the displacement in world mm
        # (linear interpolation commutes with U2W's linear part): the affine part, plus D read at
        # the grid's points (separably when the grid's axes are the working grid's)
        affine = grid_affine_map(dst.unit_to_world() @ to_src, grid.shape, dtype=dtype, device=self.phi.device)
        return affine.add_(sample_affine(self._world_displacement(inverse, affine_only, dtype), to_src, grid.shape))

    def map_points(self, points: torch.Tensor, *, inverse: bool = False,
                   affine_only: bool = False) -> torch.Tensor:
        """The transform at arbitrary world points: ``(1, 3, ...)`` LPS mm → ``(1, 3, ...)`` mm, float64.

        Forward maps fixed-space points to moving-space points, ``inverse`` the other way.
        """
        src, dst = (self.moving_grid, self.fixed_grid) if inverse else (self.fixed_grid, self.moving_grid)
        spatial = points.shape[2:]
        inner = apply_homogeneous(src.world_to_unit(), points.double().reshape(1, 3, -1)).reshape(1, 3, -1, 1, 1)
        unit = self._compose(inverse, affine_only, inner.to(self.phi.device))
        return apply_homogeneous(dst.unit_to_world(), unit).reshape(1, 3, *spatial)

    def _compose(self, inverse: bool, affine_only: bool, inner: torch.Tensor) -> torch.Tensor:
        """``phi ∘ inner`` for the requested map (its displacement cached per dtype: see
        :func:`avsm.core.sampling.compose`)."""
        key = (inverse, affine_only, inner.dtype)
        maps = (self.phi, self.phi_inv, self.phi_affine)
        cache = self.__dict__.setdefault("_displacements", {})
        hit = cache.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], maps)):  # maps replaced: recompute
            hit = cache[key] = (maps, map_displacement(self._map(inverse, affine_only).to(inner.dtype)))
        return compose_displacement(hit[1], inner)

    def _world_displacement(self, inverse: bool, affine_only: bool, dtype: torch.dtype) -> torch.Tensor:
        """``U2W_lin(phi - id)`` on the working grid of the requested map: its displacement in world mm
        (``(1, 3, *working shape)``, ``dtype``; cached like :meth:`_compose`'s)."""
        key = ("world", inverse, affine_only, dtype)
        maps = (self.phi, self.phi_inv, self.phi_affine)
        cache = self.__dict__.setdefault("_displacements", {})
        hit = cache.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], maps)):
            dst = self.fixed_grid if inverse else self.moving_grid
            lin = np.eye(4)
            lin[:3, :3] = dst.unit_to_world()[:3, :3]
            phi = self._map(inverse, affine_only, dtype)
            # in slabs of 16 slices: no whole-grid float64 temporaries (a 1 mm brain's map is 126 MB)
            disp = torch.empty(phi.shape, dtype=dtype, device=phi.device)
            axes = [torch.linspace(0.0, 1.0, n, dtype=dtype, device=phi.device) if n > 1
                    else torch.zeros(1, dtype=dtype, device=phi.device) for n in phi.shape[2:]]
            for z0 in range(0, phi.shape[2], 16):
                z1 = min(z0 + 16, phi.shape[2])
                ident = torch.stack(torch.meshgrid(axes[0][z0:z1], axes[1], axes[2], indexing="ij")).unsqueeze(0)
                disp[:, :, z0:z1] = apply_homogeneous(lin, phi[:, :, z0:z1].to(dtype) - ident)
            hit = cache[key] = (maps, disp)
        return hit[1]

    def _map(self, inverse: bool, affine_only: bool, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The working-grid unit map of the requested direction (stored maps as they are; an affine
        inverse in ``dtype``); callers convert slab by slab."""
        if inverse:
            if affine_only:
                Ai, bi = invert_affine(self.A.double(), self.b.double())
                return affine_map(Ai.to(dtype), bi.to(dtype), self.moving_grid.shape)
            return self.phi_inv
        return self.phi_affine if affine_only else self.phi

    def folds(self) -> int:
        """Voxels with ``det J < 0`` on the fixed working grid (the registration's own grid)."""
        return count_folds_in_slabs(self.phi)
