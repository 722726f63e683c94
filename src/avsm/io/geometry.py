"""World geometry of an image grid: the only place (with :mod:`avsm.export`) that
knows about millimetres, origins and directions.

Conventions (see :mod:`avsm.core.coords` for the unit-cube convention):

* ``Grid.shape`` is in **tensor order** ``(D, H, W)``, which is numpy's order for
  ``sitk.GetArrayFromImage`` (``z, y, x``).  Tensor axis ``t`` is ITK axis ``2 - t``.
* ``spacing``, ``origin`` and ``direction`` are in **ITK order** ``(x, y, z)``,
  in millimetres, in ITK's **LPS** world.  ``direction`` is the 3x3 direction
  matrix flattened row-major (as ``sitk.Image.GetDirection``); its column ``k``
  is the world direction of ITK index axis ``k``.
* Unit coordinate along tensor axis ``c`` is ``u_c = i_c / (N_c - 1)``; an axis
  of length 1 uses ``N_c - 1 := 1`` so that its unit coordinate equals the index.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["Grid", "unit_affine_between"]

Vec3 = tuple[float, float, float]
Shape3 = tuple[int, int, int]


def _denom(n: int) -> int:
    """``N - 1`` with axes of length 1 treated as ``1``."""
    return max(int(n) - 1, 1)


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3-D image grid.

    Attributes:
        shape: number of voxels in tensor order ``(D, H, W)`` = ITK ``(z, y, x)``.
        spacing: voxel spacing in mm, ITK order ``(x, y, z)``.
        origin: world position (LPS, mm) of the voxel with index ``(0, 0, 0)``.
        direction: 3x3 direction cosine matrix, ITK row-major 9-tuple.
    """

    shape: Shape3
    spacing: Vec3
    origin: Vec3
    direction: tuple[float, float, float, float, float, float, float, float, float]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        spacing = tuple(float(s) for s in self.spacing)
        origin = tuple(float(o) + 0.0 for o in self.origin)
        direction = tuple(float(d) + 0.0 for d in np.asarray(self.direction, dtype=np.float64).reshape(-1))
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise ValueError(f"Grid.shape must be 3 positive integers, got {self.shape}")
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"Grid.spacing must be 3 positive finite numbers, got {self.spacing}")
        if len(origin) != 3 or not all(math.isfinite(o) for o in origin):
            raise ValueError(f"Grid.origin must be 3 finite numbers, got {self.origin}")
        if len(direction) != 9 or not all(math.isfinite(d) for d in direction):
            raise ValueError(f"Grid.direction must be 9 finite numbers, got {self.direction}")
        if abs(np.linalg.det(np.asarray(direction).reshape(3, 3))) < 1e-6:
            raise ValueError(f"Grid.direction is singular: {self.direction}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> Grid:
        """Geometry of a 3-D SimpleITK image.

        Args:
            img: a 3-D ``sitk.Image`` (any pixel type).

        Returns:
            The image's grid; ``shape`` is the reversed ``img.GetSize()``.
        """
        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3-D image, got {img.GetDimension()}-D")
        size = img.GetSize()
        return cls(
            shape=(size[2], size[1], size[0]),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=img.GetDirection(),
        )

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty (zero) image carrying this geometry, e.g. as a resampling reference.

        Args:
            pixel_type: SimpleITK pixel ID of the (zero-filled) image.

        Returns:
            ``sitk.Image`` of size ``itk_size``.
        """
        img = sitk.Image(list(self.itk_size), pixel_type)
        self.apply_to(img)
        return img

    def apply_to(self, img: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction of ``img`` (same size required) in place.

        Returns:
            ``img`` itself, for chaining.
        """
        if tuple(img.GetSize()) != self.itk_size:
            raise ValueError(f"image size {img.GetSize()} does not match grid size {self.itk_size}")
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    # ------------------------------------------------------------------ properties

    @property
    def itk_size(self) -> Shape3:
        """Number of voxels in ITK order ``(x, y, z)`` = reversed ``shape``."""
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        """``(3, 3)`` float64 direction matrix; column ``k`` = world direction of ITK axis ``k``."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def extent_mm(self) -> Vec3:
        """Distance in mm between the first and last voxel centres, ITK order ``(x, y, z)``."""
        return tuple(s * (n - 1) for s, n in zip(self.spacing, self.itk_size))  # type: ignore[return-value]

    @property
    def num_voxels(self) -> int:
        """Total number of voxels."""
        return int(np.prod(self.shape))

    # ------------------------------------------------------------------ transforms

    def index_to_world(self) -> np.ndarray:
        """Homogeneous ``(4, 4)`` float64 matrix: world_LPS = M @ [ix, iy, iz, 1] (ITK index order)."""
        M = np.eye(4)
        M[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        M[:3, 3] = self.origin
        return M

    def unit_to_world(self) -> np.ndarray:
        """Homogeneous ``(4, 4)`` float64 matrix from unit coordinates to world (LPS, mm).

        ``world = M @ [u0, u1, u2, 1]`` where ``u_c`` is the unit coordinate along
        tensor axis ``c`` (``u_c = i_c / (N_c - 1)``, ``N_c - 1 := 1`` when ``N_c = 1``).
        """
        D, H, W = self.shape
        P = np.zeros((4, 4))
        P[0, 2] = _denom(W)  # ITK x index from u2
        P[1, 1] = _denom(H)  # ITK y index from u1
        P[2, 0] = _denom(D)  # ITK z index from u0
        P[3, 3] = 1.0
        return self.index_to_world() @ P

    def world_to_unit(self) -> np.ndarray:
        """Inverse of :meth:`unit_to_world`, ``(4, 4)`` float64."""
        return np.linalg.inv(self.unit_to_world())

    def world_corners(self) -> np.ndarray:
        """World positions (LPS, mm) of the 8 corner voxel centres, ``(8, 3)`` float64."""
        u = np.array(list(itertools.product((0.0, 1.0), repeat=3)))
        if any(n == 1 for n in self.shape):
            u[:, [n == 1 for n in self.shape]] = 0.0
        uh = np.concatenate([u, np.ones((8, 1))], axis=1)
        return (self.unit_to_world() @ uh.T).T[:, :3]

    # ------------------------------------------------------------------ derived grids

    def resized(self, shape: Sequence[int]) -> Grid:
        """The same physical box sampled with a new number of voxels.

        The first and last voxel centres stay where they are (so
        :meth:`unit_to_world` is unchanged); spacing becomes
        ``s' = s (N - 1) / (N' - 1)`` (``N - 1 := 1`` for axes of length 1).

        Args:
            shape: new shape in tensor order ``(D, H, W)``.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be 3 positive integers, got {shape}")
        new_itk = (shape[2], shape[1], shape[0])
        spacing = tuple(
            s * _denom(n) / _denom(m) for s, n, m in zip(self.spacing, self.itk_size, new_itk)
        )
        return Grid(
            shape=shape,  # type: ignore[arg-type]
            spacing=spacing,  # type: ignore[arg-type]
            origin=self.origin,
            direction=self.direction,
        )

    def slab(self, start: int, stop: int) -> Grid:
        """The sub-grid of tensor-axis-0 slices ``start:stop`` (ITK z), same voxel centres.

        ``Grid.slab(z0, z1)`` covers exactly the voxels ``[z0:z1, :, :]`` of this grid;
        computing anything voxel-wise on slabs and stacking them equals computing it on
        the whole grid (how outputs are written for large images).

        Args:
            start, stop: slice range, ``0 <= start < stop <= shape[0]``.
        """
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"slab {start}:{stop} outside 0:{self.shape[0]}")
        origin = (self.index_to_world() @ np.array([0.0, 0.0, float(start), 1.0]))[:3]
        return Grid(shape=(stop - start, self.shape[1], self.shape[2]), spacing=self.spacing,
                    origin=tuple(origin), direction=self.direction)  # type: ignore[arg-type]

    def working_grid(
        self,
        spacing_mm: float | Sequence[float] | None = 2.0,
        shape: Sequence[int] | None = None,
        multiple_of: int = 16,
        min_size: int = 32,
    ) -> Grid:
        """A grid over the same physical box, sized for a network.

        The box (first and last voxel centres, direction) is kept, so the unit
        coordinates of the result coincide with those of ``self``.  Unless
        ``shape`` is given, each axis gets ``ceil(extent / spacing_mm) + 1``
        voxels rounded up to a multiple of ``multiple_of`` and at least
        ``min_size``; the resulting spacing is therefore ``<= spacing_mm``.
        Apply to :meth:`canonical` first to get a consistently oriented grid.

        Args:
            spacing_mm: target (largest) spacing in mm, one value or one per ITK
                axis (x, y, z); ``None`` uses the grid's own spacing per axis (only
                the rounding applies).
            shape: explicit tensor-order shape ``(D, H, W)``; overrides the rest.
            multiple_of: each dimension is rounded up to a multiple of this.
            min_size: smallest allowed dimension.

        Returns:
            The working grid.
        """
        if shape is not None:
            return self.resized(shape)
        if multiple_of < 1 or min_size < 1:
            raise ValueError("multiple_of and min_size must be >= 1")
        if spacing_mm is None:
            steps: list[float | None] = [None, None, None]
        elif isinstance(spacing_mm, (int, float)):
            steps = [float(spacing_mm)] * 3
        else:
            steps = [float(v) for v in spacing_mm]
        if len(steps) != 3 or any(v is not None and not v > 0 for v in steps):
            raise ValueError(f"spacing_mm must be positive (one value or three), got {spacing_mm}")
        new_itk = []
        for s, n, target in zip(self.spacing, self.itk_size, steps):
            step = s if target is None else target
            extent = s * (n - 1)
            m = math.ceil(extent / step - 1e-6) + 1
            m = math.ceil(m / multiple_of) * multiple_of
            new_itk.append(max(m, min_size))
        return self.resized((new_itk[2], new_itk[1], new_itk[0]))

    def canonical_axes(self) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
        """Tensor-axis permutation and flips that bring this grid to :meth:`canonical`.

        Returns:
            ``(perm, flips)`` such that an array ``a`` of shape ``self.shape``
            becomes the canonical array by
            ``np.flip(np.transpose(a, perm), axis=[t for t in range(3) if flips[t]])``.
        """
        Dm = self.direction_matrix
        best = max(
            itertools.permutations(range(3)),
            key=lambda p: sum(abs(Dm[j, p[j]]) for j in range(3)),
        )
        flips_itk = [bool(Dm[j, best[j]] < 0) for j in range(3)]
        perm = tuple(2 - best[2 - t] for t in range(3))
        flips = tuple(flips_itk[2 - t] for t in range(3))
        return perm, flips  # type: ignore[return-value]

    def canonical(self) -> Grid:
        """The same voxel centres re-indexed so the direction is closest to identity.

        Axes are permuted and flipped (no resampling) so that ITK axes run
        along L, P, S as closely as possible (like ``sitk.DICOMOrient(img,
        "LPS")``); tensor axis 0 is then ≈ S-I, 1 ≈ A-P, 2 ≈ L-R.
        Use :meth:`canonical_axes` to rearrange the voxel array accordingly.
        """
        Dm = self.direction_matrix
        perm_t, flips_t = self.canonical_axes()
        # back to ITK axes: new ITK axis j = old ITK axis p[j]
        p = [2 - perm_t[2 - j] for j in range(3)]
        f = [flips_t[2 - j] for j in range(3)]
        size = self.itk_size
        origin = np.asarray(self.origin, dtype=np.float64)
        cols = []
        for j in range(3):
            k = p[j]
            col = Dm[:, k]
            if f[j]:
                origin = origin + col * self.spacing[k] * (size[k] - 1)
                col = -col
            cols.append(col)
        new_dir = np.stack(cols, axis=1)
        new_itk = [size[k] for k in p]
        return Grid(
            shape=(new_itk[2], new_itk[1], new_itk[0]),
            spacing=tuple(self.spacing[k] for k in p),  # type: ignore[arg-type]
            origin=tuple(origin),  # type: ignore[arg-type]
            direction=tuple(new_dir.reshape(-1)),  # type: ignore[arg-type]
        )

    def is_close(self, other: Grid, tol: float = 1e-3) -> bool:
        """Same shape, and spacing/origin (mm) and direction equal within ``tol``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=tol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=tol)
        )


def unit_affine_between(fixed: Grid, moving: Grid) -> np.ndarray:
    """Homogeneous ``(4, 4)`` float64 map from fixed unit coordinates to moving unit coordinates.

    Goes through the world: ``moving.world_to_unit() @ fixed.unit_to_world()``.
    The result is in the corner-origin form accepted by
    :func:`avsm.core.coords.homogeneous_to_centred`.
    """
    return moving.world_to_unit() @ fixed.unit_to_world()
