"""Export of avsm registrations as ITK/ANTs transforms, and import of foreign transforms.

Conventions (verified against ``antspyx`` 0.6.3 / ITK 5.4, see ``tests/test_export.py``):

* Everything is a **pull-back** in the physical LPS world (mm): a transform maps a
  point of the *fixed* (reference) space to the point of the *moving* space to
  read, exactly like ``result.world_map()`` and ``sitk.Resample``.
* ANTs' transform list ``[T0, T1, ..., Tn]`` (``antsApplyTransforms -t T0 -t T1 ...``,
  ``ants.apply_transforms(transformlist=[T0, T1])``) maps a reference point ``x``
  to ``Tn(...T1(T0(x)))``: **the first listed transform is applied first to the
  point**.  ANTs' own output ``[P1Warp.nii.gz, P0GenericAffine.mat]`` therefore
  means ``total(x) = Affine(x + d(x))``: the warp's displacement ``d`` lives on
  the fixed grid and is applied before the affine.  In a SimpleITK
  ``CompositeTransform`` the *last added* transform is applied first, so the
  list is added in reverse order (:func:`load_transform` does this).
* The inverse, ANTs-style, is ``[[P0GenericAffine.mat, inverted], P1InverseWarp.nii.gz]``:
  ``total^-1(y) = Affine^-1(y) + e(Affine^-1(y))``; ``P1InverseWarp`` therefore
  also lives on the **fixed** grid (as in ANTs).
* Displacement fields are written as 3-component vector images (ITK writes
  NIfTI with ``intent_code`` 1007, dims ``(X, Y, Z, 1, 3)``) holding LPS mm
  displacements ``T(x) - x`` at the voxel centres of their grid.

Files written by :func:`write_transforms` for a prefix ``P``:

==========================  ==========================================================
``P0GenericAffine.mat``     (``ants``) affine part, ITK ``AffineTransform_double_3_3`` (MATLAB format)
``P1Warp.nii.gz``           (``ants``) ``d(x) = Affine^-1(total(x)) - x`` on the fixed image's own grid
``P1InverseWarp.nii.gz``    (``ants``) ``e(z) = total^-1(Affine(z)) - z`` on the fixed image's own grid
``Pavsm.npz``               (``avsm``) affine + low-resolution velocities, :mod:`avsm.export.compact`
``PComposite.nii.gz``       (``composite``) ``total(x) - x`` on the fixed image's own grid
``PInverseComposite.nii.gz`` (``composite``) ``total^-1(y) - y`` on the moving image's own grid
``P0GenericAffine.tfm``     (``tfm``) the affine as ITK text
``Pdisp_l2r.nii.gz``        (``l2r``) Learn2Reg voxel displacement, see :func:`l2r_displacement`
``PComposite.h5``           (``h5``) ITK HDF5 ``[affine, warp]``, as antsRegistration writes; :mod:`avsm.export.h5`
``PInverseComposite.h5``    (``h5``) its inverse ``[inverse warp, inverse affine]``
==========================  ==========================================================
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from avsm.core.coords import centred_to_homogeneous
from avsm.core.sampling import (
    affine_sampling_grid,
    axis_aligned,
    grid_sample_split,
    sample_affine,
    sample_axis_aligned,
    warp,
)
from avsm.errors import AvsmError
from avsm.io.geometry import Grid
from avsm.io.nifti import write_nifti
from avsm.io.outputs import OutputTransaction
from avsm.transform import apply_homogeneous, grid_affine_map, slab_ranges
from avsm.transform import grid_world_points as _world_points

if TYPE_CHECKING:
    from avsm.transform import RegistrationResult

__all__ = [
    "DEFAULT_FORMATS",
    "FORMATS",
    "ROLES",
    "field_slab",
    "write_displacement_nifti",
    "world_affine",
    "affine_to_sitk",
    "grid_world_points",
    "world_points_to_displacement",
    "displacement_image",
    "export_fields",
    "l2r_displacement",
    "write_transforms",
    "load_transform",
    "parse_transform_spec",
    "transform_paths_for_prefix",
]

log = logging.getLogger(__name__)

#: Output formats understood by :func:`write_transforms`.
FORMATS: tuple[str, ...] = ("ants", "avsm", "composite", "tfm", "l2r", "h5")

#: What ``avsm register`` writes unless told otherwise: what antsRegistration writes, and
#: avsm's compact file.
DEFAULT_FORMATS: tuple[str, ...] = ("ants", "avsm")

#: role -> file-name suffix appended to the prefix.
ROLES: dict[str, str] = {
    "affine": "0GenericAffine.mat",
    "affine_tfm": "0GenericAffine.tfm",
    "warp": "1Warp.nii.gz",
    "inverse_warp": "1InverseWarp.nii.gz",
    "composite": "Composite.nii.gz",
    "inverse_composite": "InverseComposite.nii.gz",
    "l2r": "disp_l2r.nii.gz",
    "compact": "avsm.npz",
    "composite_h5": "Composite.h5",
    "inverse_composite_h5": "InverseComposite.h5",
}

_TRANSFORM_EXTS = (".mat", ".tfm", ".txt", ".h5", ".hdf5", ".hdf", ".xfm")
_IMAGE_EXTS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

_DTYPES = {"float32": np.float32, "float64": np.float64}


# --------------------------------------------------------------------------- helpers


def world_affine(result: RegistrationResult) -> np.ndarray:
    """The affine part of ``result`` as a world (LPS mm) pull-back matrix.

    Built from ``result.A``, ``result.b`` (centred, working unit coordinates):
    ``M = moving_grid.unit_to_world @ H(A, b) @ fixed_grid.world_to_unit``.

    Returns:
        ``(4, 4)`` float64 homogeneous matrix: fixed-space point (mm) -> moving-space point (mm).
    """
    A = torch.as_tensor(result.A, dtype=torch.float64).reshape(1, 3, 3)
    b = torch.as_tensor(result.b, dtype=torch.float64).reshape(1, 3)
    H = centred_to_homogeneous(A, b)[0].numpy()
    return result.moving_grid.unit_to_world() @ H @ result.fixed_grid.world_to_unit()


def affine_to_sitk(M: np.ndarray, center: Sequence[float] = (0.0, 0.0, 0.0)) -> sitk.AffineTransform:
    """An ITK ``AffineTransform`` equal to the homogeneous matrix ``M``.

    Args:
        M: ``(4, 4)`` world matrix (``y = M[:3, :3] x + M[:3, 3]``, mm).
        center: fixed parameter (rotation centre, mm); the mapping does not depend on it.

    Returns:
        ``sitk.AffineTransform`` with ``TransformPoint(x) == (M @ [x, 1])[:3]``.
    """
    M = np.asarray(M, dtype=np.float64)
    L = M[:3, :3]
    c = np.asarray(center, dtype=np.float64)
    t = M[:3, 3] + L @ c - c  # ITK: y = L (x - c) + c + t
    tr = sitk.AffineTransform(3)
    tr.SetCenter(tuple(float(v) for v in c))
    tr.SetMatrix(tuple(float(v) for v in L.reshape(-1)))
    tr.SetTranslation(tuple(float(v) for v in t))
    return tr


def grid_world_points(grid: Grid) -> np.ndarray:
    """World (LPS mm) positions of the voxel centres of ``grid``.

    Returns:
        ``(3, D, H, W)`` float64; channel ``k`` is world coordinate ``k`` (x, y, z).
    """
    return _world_points(grid)[0].numpy()


def _as_points(points: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(1, 3, D, H, W)`` or ``(3, D, H, W)`` tensor/array -> ``(3, D, H, W)`` float64 array."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise ValueError(f"expected a batch of 1, got {arr.shape}")
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise ValueError(f"expected points of shape (1, 3, D, H, W) or (3, D, H, W), got {arr.shape}")
    return arr


def world_points_to_displacement(points: torch.Tensor | np.ndarray, grid: Grid) -> np.ndarray:
    """Displacement ``points - x`` at the voxel centres ``x`` of ``grid``.

    Args:
        points: ``(1, 3, D, H, W)`` or ``(3, D, H, W)`` world points (LPS mm) that the
            voxels of ``grid`` map to (e.g. ``result.world_map(grid)``).
        grid: the grid the points are given on (``grid.shape == (D, H, W)``).

    Returns:
        ``(3, D, H, W)`` float64 displacement in LPS mm.
    """
    arr = _as_points(points)
    if tuple(arr.shape[1:]) != grid.shape:
        raise ValueError(f"points shape {arr.shape[1:]} does not match grid shape {grid.shape}")
    return arr - grid_world_points(grid)


def displacement_image(disp: np.ndarray, grid: Grid, dtype: str = "float32") -> sitk.Image:
    """A displacement field as the vector image ITK/ANTs read.

    Args:
        disp: ``(3, D, H, W)`` LPS mm displacement (channel = world x, y, z).
        grid: its grid.
        dtype: ``"float32"`` (as ANTs writes) or ``"float64"``.

    Returns:
        ``sitk.Image`` of size ``grid.itk_size`` with 3 components per voxel
        (``sitkVectorFloat32``/``64``) and ``grid``'s geometry.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    arr = np.ascontiguousarray(np.moveaxis(np.asarray(disp), 0, -1).astype(_DTYPES[dtype]))
    img = sitk.GetImageFromArray(arr, isVector=True)
    return grid.apply_to(img)


def _affine_image_grid(M: np.ndarray, grid: Grid) -> Grid:
    """A (possibly sheared) pseudo-grid whose voxel centres are ``M`` applied to ``grid``'s.

    Used to evaluate ``result.world_map`` at the points ``M(x)``; only its
    ``unit_to_world`` matters, so the direction need not be orthonormal.
    """
    I2W = np.asarray(M, dtype=np.float64) @ grid.index_to_world()
    cols = I2W[:3, :3]
    norms = np.linalg.norm(cols, axis=0)  # per-axis step (mm), so the direction stays well scaled
    return Grid(shape=grid.shape, spacing=tuple(norms), origin=tuple(I2W[:3, 3]),
                direction=tuple((cols / norms).reshape(-1)))


def _apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a ``(4, 4)`` matrix to ``(3, ...)`` points."""
    flat = pts.reshape(3, -1)
    return (M[:3, :3] @ flat + M[:3, 3:4]).reshape(pts.shape)


#: role -> the grid its displacement field lives on
_FIELD_GRID = {"warp": "fixed", "inverse_warp": "fixed", "composite": "fixed", "inverse_composite": "moving"}


def field_slab(result: RegistrationResult, role: str, grid: Grid, M: np.ndarray | None = None,
               world: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """One displacement field of the ANTs-style export on ``grid`` (any grid or slab of one).

    Args:
        result: the registration.
        role: ``warp`` (``d(x) = Affine^-1(total(x)) - x``), ``inverse_warp``
            (``e(z) = total^-1(Affine(z)) - z``), ``composite`` (``total(x) - x``) or
            ``inverse_composite`` (``total^-1(y) - y``).
        grid: where to evaluate it (the fixed image's grid, the moving image's for
            ``inverse_composite``, or a :meth:`Grid.slab` of it).
        M: the world affine (default :func:`world_affine`).
        world: ``result.world_map(grid)`` when already computed (``warp``, ``composite``).
        dtype: of the map evaluation (float32 for written fields: about 3e-5 mm).

    Returns:
        ``(3, *grid.shape)`` LPS mm displacement (numpy, ``dtype``).
    """
    M = world_affine(result) if M is None else M
    if role == "inverse_warp":
        return _inverse_warp_slab(result, grid, M, dtype)
    if role not in ("warp", "composite", "inverse_composite"):
        raise ValueError(f"unknown field role {role!r}")
    if world is not None and role != "inverse_composite":
        x = _world_points(grid, dtype)
        total = world.to(dtype)
        d = total - x if role == "composite" else apply_homogeneous(np.linalg.inv(M), total) - x
        return d[0].numpy()
    # total(x) = A_w(t) + D(T(t)) (see RegistrationResult.world_map), t the grid's unit coordinates: the
    # field is an affine map of t with small coefficients plus the displacement read at T(t), with no
    # subtraction of two world positions (float32 keeps about 1e-6 mm)
    inverse = role == "inverse_composite"
    src, dst = (result.moving_grid, result.fixed_grid) if inverse else (result.fixed_grid, result.moving_grid)
    to_src = src.world_to_unit() @ grid.unit_to_world()
    post = np.linalg.inv(M) if role == "warp" else np.eye(4)
    affine = post @ dst.unit_to_world() @ to_src - grid.unit_to_world()
    affine[3] = (0.0, 0.0, 0.0, 1.0)
    D = result._world_displacement(inverse, False, dtype)
    if role == "warp":
        lin = np.eye(4)
        lin[:3, :3] = post[:3, :3]
        D = apply_homogeneous(lin, D)
    return grid_affine_map(affine, grid.shape, dtype=dtype).add_(sample_affine(D, to_src, grid.shape))[0].numpy()


def _inverse_warp_slab(result: RegistrationResult, grid: Grid, M: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``e(z) = total^-1(Affine(z)) - z`` on ``grid`` (see :func:`field_slab`), ``(3, *grid.shape)`` mm.

    With ``T`` the map from ``grid``'s unit coordinates to the moving working grid's
    (``z -> Affine(z)``) and ``E`` avsm's inverse displacement in world mm there,
    ``e = (U2W_fixed T - U2W_grid)(t) + E(T(t))``: one affine map and one trilinear read of ``E``
    (separable when ``T`` keeps the axes), no world points subtracted from each other.
    avsm's inverse is only defined on the moving working box; where ``Affine(z)`` leaves it,
    the forward warp (defined everywhere) is inverted by fixed-point iteration
    (:func:`_invert_warp_at`).
    """
    to_src = result.moving_grid.world_to_unit() @ M @ grid.unit_to_world()
    E = result._world_displacement(True, False, dtype)
    axes = axis_aligned(to_src)
    if axes is None:
        g = affine_sampling_grid(to_src, grid.shape, dtype=dtype)
        e = grid_sample_split(E, g, padding="border")
        outside = (g.abs() > 1 + 2e-6).any(-1)[0]  # unit coordinate outside [-1e-6, 1 + 1e-6]
    else:
        e = sample_axis_aligned(E, axes, grid.shape)
        outside = torch.zeros(grid.shape, dtype=torch.bool)
        for k, sc, sh in zip(*axes):  # input axis a: output axis k = perm[a], scale, shift
            n = grid.shape[k]
            u = (torch.linspace(0.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64))
            u = u * sc + sh
            view = [1, 1, 1]
            view[k] = n
            outside |= ((u < -1e-6) | (u > 1 + 1e-6)).view(view)
    affine = result.fixed_grid.unit_to_world() @ to_src - grid.unit_to_world()
    affine[3] = (0.0, 0.0, 0.0, 1.0)
    e = e.add_(grid_affine_map(affine, grid.shape, dtype=dtype))[0].numpy()
    out = outside.numpy()
    if out.any():
        idx = np.stack(np.nonzero(out)[::-1]).astype(np.float64)  # (x, y, z) voxel indices
        z = _apply(grid.index_to_world(), idx)
        e[:, out] = _invert_warp_at(result, np.linalg.inv(M), z, e[:, out])
    return e


def export_fields(result: RegistrationResult) -> dict[str, np.ndarray]:
    """All displacement fields of the ANTs-style export, in memory (small images; files are
    written slab by slab by :func:`write_transforms`).

    Returns:
        ``{"affine": (4, 4) world matrix (fixed mm -> moving mm),
        "warp": (3, *fixed.shape), "inverse_warp": (3, *fixed.shape),
        "composite": (3, *fixed.shape), "inverse_composite": (3, *moving.shape)}``;
        the fields are float64 LPS mm displacements on the images' own grids
        (``result.fixed_original`` / ``result.moving_original``).
    """
    M = world_affine(result)
    out: dict[str, np.ndarray] = {"affine": M}
    for role in ("warp", "inverse_warp", "composite", "inverse_composite"):
        grid = result.fixed_original if _FIELD_GRID[role] == "fixed" else result.moving_original
        out[role] = field_slab(result, role, grid, M)
    return out


def _invert_warp_at(result: RegistrationResult, Minv: np.ndarray, z: np.ndarray, e0: np.ndarray,
                    iterations: int = 50, tol: float = 1e-5) -> np.ndarray:
    """Solve ``x + d(x) = z`` for ``x`` by fixed-point iteration, ``d`` the forward warp; returns ``x - z``.

    Each iteration is ``e <- -d(z + e)`` with ``d(p) = Minv(total(p)) - p`` read, as ITK reads a
    field, at ``p`` clipped to the fixed working box.  With ``p_u`` the fixed working unit
    coordinates of ``p`` and ``D`` the forward displacement in world mm on the working grid
    (cached by the result), ``-d(p) = R p_u - Minv_lin D(p_u)`` where
    ``R = U2W_fixed - Minv U2W_moving``: one trilinear read of ``D`` (float64) per point and
    iteration, vectorised in torch, only for the points not yet converged.

    Args:
        result: the registration.
        Minv: ``(4, 4)`` inverse world affine.
        z: ``(3, N)`` world points (mm).
        e0: ``(3, N)`` initial guess of ``x - z`` (mm).
        iterations, tol: at most this many iterations; a point is done when it moves less
            than ``tol`` mm.

    Returns:
        ``(3, N)`` float64 inverse displacement ``e(z)`` in mm.
    """
    f64 = torch.float64
    zt = torch.as_tensor(np.asarray(z, dtype=np.float64))
    e = torch.tensor(np.asarray(e0, dtype=np.float64))
    W2U = torch.as_tensor(result.fixed_grid.world_to_unit(), dtype=f64)
    R = torch.as_tensor(result.fixed_grid.unit_to_world() - Minv @ result.moving_grid.unit_to_world(), dtype=f64)
    Mlin = torch.as_tensor(Minv[:3, :3], dtype=f64)
    D = result._world_displacement(False, False, f64)  # (1, 3, d, h, w): U2W_moving_lin (phi - id), mm
    active = torch.arange(e.shape[1])
    for _ in range(iterations):
        za, ea = zt[:, active], e[:, active]
        pu = (W2U[:3, :3] @ (za + ea) + W2U[:3, 3:]).clamp_(0.0, 1.0)
        Dp = warp(D, pu.reshape(1, 3, -1, 1, 1), padding="border").reshape(3, -1)
        e_new = R[:3, :3] @ pu + R[:3, 3:] - Mlin @ Dp
        moving = (e_new - ea).abs().amax(0) >= tol
        e[:, active] = e_new
        active = active[moving]
        if active.numel() == 0:
            break
    return e.numpy()


def l2r_displacement(result: RegistrationResult) -> np.ndarray:
    """Learn2Reg-style voxel displacement on the fixed image's own grid.

    ``disp[c, i, j, k] = m_c(total(x_ijk)) - (i, j, k)_c`` where ``m`` is the
    continuous ITK index (x, y, z order) in the moving image's own grid and
    ``(i, j, k)`` the fixed voxel index (x, y, z); so
    ``scipy.ndimage.map_coordinates(moving_xyz, identity + disp)`` reproduces
    the warp (Learn2Reg's evaluation convention; exact when both images share a grid).

    Returns:
        ``(3, X, Y, Z)`` float64 array in moving voxel units (nibabel/ITK index order).
    """
    fixed, moving = result.fixed_original, result.moving_original
    total = _as_points(result.world_map(fixed))  # (3, D, H, W)
    m_idx = _apply(np.linalg.inv(moving.index_to_world()), total)  # (3 [x,y,z], D, H, W)
    D, H, W = fixed.shape
    iz, iy, ix = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    disp = m_idx - np.stack([ix, iy, iz], axis=0)
    return np.ascontiguousarray(disp.transpose(0, 3, 2, 1))  # (3, X, Y, Z)


def _l2r_image(disp_cxyz: np.ndarray, grid: Grid) -> sitk.Image:
    """4-D float32 image of nibabel shape ``(X, Y, Z, 3)`` carrying ``grid``'s geometry."""
    arr = np.ascontiguousarray(disp_cxyz.transpose(0, 3, 2, 1).astype(np.float32))  # (3, Z, Y, X)
    img = sitk.GetImageFromArray(arr, isVector=False)  # size (X, Y, Z, 3)
    img.SetSpacing(tuple(grid.spacing) + (1.0,))
    img.SetOrigin(tuple(grid.origin) + (0.0,))
    D4 = np.eye(4)
    D4[:3, :3] = grid.direction_matrix
    img.SetDirection(tuple(D4.reshape(-1)))
    return img


def _write_image(img: sitk.Image, tmp: str, final: str) -> None:
    try:
        sitk.WriteImage(img, tmp, True)
    except RuntimeError as e:
        raise AvsmError(f"cannot write transform image: {str(e).strip().splitlines()[-1][:160]}", final) from e


def write_displacement_nifti(disp: np.ndarray, grid: Grid, path: str, final: str | None = None, *,
                             level: int = 1) -> None:
    """Write a ``(3, D, H, W)`` float32 LPS mm displacement as the NIfTI vector image ITK/ANTs read.

    ITK's layout (``intent_code`` 1007, dims ``(X, Y, Z, 1, 3)``, LPS vectors), streamed
    without a copy into a standard ``.nii.gz`` (:func:`avsm.io.nifti.write_nifti`): ``level`` 1
    (default) is fast deflate (ISA-L if installed, else zlib run-length coding on several threads;
    a brain field shrinks by 14-21 %), 0 stored blocks.

    Raises:
        AvsmError: the file cannot be written (names ``final``, default ``path``).
    """
    if disp.dtype != np.float32:
        raise ValueError(f"expected float32, got {disp.dtype}")
    write_nifti(disp, grid, path, vector=True, level=level, final=final)


def _write_field(result: RegistrationResult, role: str, M: np.ndarray, tmp: str, final: str,
                 dtype: str, disp: np.ndarray | None = None) -> None:
    """Compute one field slab by slab into a single float32 array (unless given) and write it."""
    grid = result.fixed_original if _FIELD_GRID[role] == "fixed" else result.moving_original
    if disp is None:
        disp = np.empty((3, *grid.shape), dtype=np.float32)
        for z0, z1 in slab_ranges(grid):
            disp[:, z0:z1] = field_slab(result, role, grid.slab(z0, z1), M, dtype=torch.float32)
    if dtype == "float32":
        write_displacement_nifti(disp, grid, tmp, final)
    else:
        _write_image(displacement_image(disp, grid, dtype), tmp, final)


def write_transforms(
    result: RegistrationResult,
    prefix: str,
    tx: OutputTransaction,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dtype: str = "float32",
    fields: MutableMapping[str, np.ndarray] | None = None,
) -> dict[str, str]:
    """Write ``result`` as ANTs/ITK transform files, avsm's compact file and optionally Learn2Reg output.

    Files are staged through ``tx.path(final)`` and appear only when ``tx`` commits.
    ANTs order (verified): ``ants.apply_transforms(fixed, moving,
    transformlist=[P1Warp.nii.gz, P0GenericAffine.mat])`` equals
    ``result.warp(moving)``; ``transformlist=[P0GenericAffine.mat, P1InverseWarp.nii.gz]``
    with ``whichtoinvert=[True, False]`` equals ``result.warp(fixed, inverse=True)``;
    ``[PComposite.nii.gz]`` / ``[PInverseComposite.nii.gz]`` alone do the same.
    Each field is computed in slabs (:func:`avsm.transform.slab_ranges`) into one
    float32 array, written, and released before the next: at most one full-resolution
    field is alive.

    Args:
        result: the registration.
        prefix: output prefix, e.g. ``"out/pair_"`` (file names as in the module docstring).
        tx: the output transaction of the run.
        formats: any of ``"ants"`` (``P0GenericAffine.mat``, ``P1Warp``, ``P1InverseWarp``, as
            antsRegistration writes), ``"avsm"`` (``Pavsm.npz``, see :mod:`avsm.export.compact`),
            ``"composite"`` (``PComposite``, ``PInverseComposite``), ``"tfm"``
            (``P0GenericAffine.tfm``, ITK text) and ``"l2r"`` (``Pdisp_l2r.nii.gz``: 4-D
            float32, nibabel shape ``(X, Y, Z, 3)`` on the fixed grid, moving voxel units) and ``"h5"``
            (``PComposite.h5``, ``PInverseComposite.h5``: ITK HDF5 composites, :mod:`avsm.export.h5`).
        dtype: ``"float32"`` (default, as ANTs) or ``"float64"`` for the displacement fields.
        fields: fields already computed (``{role: (3, D, H, W) float32}``, e.g. the ``warp``
            from the pass that warped the image); each is popped from the mapping when
            written, so the caller should hold no other reference.  The others are computed here.

    Returns:
        ``{role: final path}`` with roles from :data:`ROLES`.

    Raises:
        AvsmError: unknown format, or a file cannot be written.
    """
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise AvsmError(f"unknown transform format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    prefix = os.fspath(prefix)
    out: dict[str, str] = {}

    def final(role: str) -> str:
        return prefix + ROLES[role]

    M = world_affine(result)
    linear = [role for fmt, role in (("ants", "affine"), ("tfm", "affine_tfm")) if fmt in formats]
    if linear:
        centre = result.fixed_original.unit_to_world() @ np.array([0.5, 0.5, 0.5, 1.0])
        aff = affine_to_sitk(M, centre[:3])
        for role in linear:
            p = final(role)
            try:
                sitk.WriteTransform(aff, tx.path(p))
            except RuntimeError as e:
                raise AvsmError("cannot write transform file", p) from e
            out[role] = p
    if "h5" in formats:
        from avsm.export.h5 import write_h5_composites

        # reads a given warp without consuming it (the ants files below pop it)
        out.update(write_h5_composites(result, prefix, tx, M=M, dtype=dtype,
                                       warp=fields.get("warp") if fields is not None else None))
        if fields is not None and "ants" not in formats:
            fields.pop("warp", None)
    roles = (["warp", "inverse_warp"] if "ants" in formats else []) + \
            (["composite", "inverse_composite"] if "composite" in formats else [])
    for role in roles:
        p = final(role)
        # a given field is consumed (popped), so no two full-resolution fields stay alive
        _write_field(result, role, M, tx.path(p), p, dtype, fields.pop(role, None) if fields is not None else None)
        out[role] = p
    if "avsm" in formats:
        from avsm.export.compact import save_compact

        p = final("compact")
        save_compact(result, tx.path(p))
        out["compact"] = p
    if "l2r" in formats:
        p = final("l2r")
        _write_image(_l2r_image(l2r_displacement(result), result.fixed_original), tx.path(p), p)
        out["l2r"] = p
    log.info("wrote transforms %s", ", ".join(sorted(out.values())))
    return out


# --------------------------------------------------------------------------- import


_SPEC = re.compile(r"^\[\s*(?P<path>.+?)\s*,\s*(?P<inv>[01]|true|false)\s*\]$", re.IGNORECASE)


def parse_transform_spec(spec: str) -> tuple[str, bool]:
    """Parse an ANTs-style transform argument: ``"file"`` or ``"[file,1]"`` (inverted).

    Returns:
        ``(path, invert)``.
    """
    m = _SPEC.match(spec.strip())
    if m:
        return m.group("path"), m.group("inv").lower() in ("1", "true")
    return spec, False


def transform_paths_for_prefix(prefix: str, *, inverse: bool = False) -> list[tuple[str, bool]] | None:
    """The ANTs transform list of an avsm/ANTs output prefix, if its files exist.

    Args:
        prefix: e.g. ``"out/pair_"`` (files ``out/pair_0GenericAffine.mat`` ...).
        inverse: the moving -> fixed direction instead.

    Returns:
        ``[(path, invert), ...]`` in ANTs order (composite ``.nii.gz``, else the HDF5
        composite ``.h5``, else affine and warp, else the compact ``avsm.npz`` with
        ``invert`` = ``inverse``), or ``None`` when no file is there.
    """
    for role in (("inverse_composite", "inverse_composite_h5") if inverse else ("composite", "composite_h5")):
        comp = prefix + ROLES[role]
        if os.path.isfile(comp):
            return [(comp, False)]
    aff = prefix + ROLES["affine"]
    warp = prefix + ROLES["inverse_warp" if inverse else "warp"]
    if os.path.isfile(aff):
        if inverse:
            return [(aff, True)] + ([(warp, False)] if os.path.isfile(warp) else [])
        return ([(warp, False)] if os.path.isfile(warp) else []) + [(aff, False)]
    compact = prefix + ROLES["compact"]
    if os.path.isfile(compact):
        return [(compact, inverse)]
    return None


def _is_image_file(path: str) -> bool:
    low = path.lower()
    return any(low.endswith(e) for e in _IMAGE_EXTS)


def _read_one(path: str, invert: bool) -> sitk.Transform:
    """One transform file (linear ITK/ANTs file or displacement-field image)."""
    if not os.path.exists(path):
        raise AvsmError("transform file not found", path)
    if os.path.isdir(path):
        raise AvsmError("is a directory, not a transform file", path)
    if _is_image_file(path):
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as e:
            raise AvsmError("cannot read displacement field (corrupt or unknown format)", path) from e
        if img.GetDimension() == 4 and img.GetSize()[3] == 1 and img.GetNumberOfComponentsPerPixel() == 3:
            img = img[:, :, :, 0]
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
            raise AvsmError(
                f"not a 3-D displacement field (dimension {img.GetDimension()}, "
                f"{img.GetNumberOfComponentsPerPixel()} components per voxel; expected 3)", path)
        if invert:
            raise AvsmError("a displacement field cannot be inverted; use its inverse-warp file", path)
        arr = sitk.GetArrayViewFromImage(img)
        if not np.isfinite(arr).all():
            raise AvsmError("displacement field contains NaN or Inf", path)
        return sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    try:
        tr = sitk.ReadTransform(path)
    except RuntimeError as e:
        raise AvsmError("cannot read transform file (corrupt or unknown format)", path) from e
    if tr.GetDimension() != 3:
        raise AvsmError(f"transform is {tr.GetDimension()}-D; expected 3-D", path)
    if invert:
        try:
            tr = tr.GetInverse()
        except RuntimeError as e:
            raise AvsmError("transform cannot be inverted", path) from e
    return tr


def sitk_affine_matrix(tx: sitk.Transform) -> np.ndarray:
    """Homogeneous ``(4, 4)`` world matrix of an affine-like SimpleITK transform.

    Found by mapping the origin and the three unit vectors (exact for any
    affine transform, including composite ones).
    """
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in pts])
    M = np.eye(4)
    M[:3, 3] = out[0]
    M[:3, :3] = (out[1:] - out[0]).T
    return M


def read_world_affine(spec: str) -> np.ndarray:
    """The ``(4, 4)`` world pull-back (fixed LPS mm → moving LPS mm) of a linear transform file.

    ``spec`` is a path or ANTs' ``"[path,1]"`` (inverted), read as
    ``antsRegistration --initial-moving-transform`` reads it: the transform
    maps points of the fixed image's space to the moving image's space.

    Raises:
        AvsmError: missing/corrupt file, a displacement field, or a non-linear transform.
    """
    path, invert = parse_transform_spec(spec)
    if _is_image_file(path):
        raise AvsmError("an initial transform must be linear (.mat/.txt/.tfm/.h5), not a displacement field",
                        path)
    tx = _read_one(path, invert)
    M = sitk_affine_matrix(tx)
    probe = np.array([[10.0, -20.0, 30.0], [-50.0, 40.0, 5.0]])
    got = np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in probe])
    if not np.allclose(got, probe @ M[:3, :3].T + M[:3, 3], atol=1e-6):
        raise AvsmError("an initial transform must be linear (rigid, similarity or affine)", path)
    if abs(np.linalg.det(M[:3, :3])) < 1e-8:
        raise AvsmError("initial transform is singular", path)
    return M


def load_transform(
    paths: Sequence[str | tuple[str, bool]],
    *,
    invert: Sequence[bool] | None = None,
) -> sitk.CompositeTransform:
    """Read transforms as one SimpleITK composite, with ``antsApplyTransforms`` list semantics.

    A reference-space point ``x`` is mapped to ``Tn(...T1(T0(x)))`` for the list
    ``[T0, ..., Tn]`` (the first listed is applied first to the point), e.g.
    ``[P1Warp.nii.gz, P0GenericAffine.mat]`` for ANTs/avsm forward output.

    Args:
        paths: files: ITK/ANTs linear transforms (``.mat``, ``.tfm``, ``.txt``,
            ``.h5``) or displacement-field images (``.nii[.gz]``, ``.nrrd``,
            ``.mha``...; 3-component LPS mm vectors).  Each item may be a path,
            an ANTs spec ``"[path,1]"`` (inverted), or a ``(path, invert)`` tuple.
        invert: per-item inversion flags (overrides the specs).

    Returns:
        ``sitk.CompositeTransform`` (3-D) whose ``TransformPoint`` is the pull-back.

    Raises:
        AvsmError: a missing/corrupt file, a non-3-D transform, or an inverted
            displacement field (one line naming the file).
    """
    items: list[tuple[str, bool]] = []
    for p in paths:
        if isinstance(p, tuple):
            items.append((os.fspath(p[0]), bool(p[1])))
        else:
            items.append(parse_transform_spec(os.fspath(p)))
    if invert is not None:
        if len(invert) != len(items):
            raise ValueError("invert must have one flag per transform")
        items = [(p, bool(i)) for (p, _), i in zip(items, invert)]
    if not items:
        raise AvsmError("no transform given")
    comp = sitk.CompositeTransform(3)
    for path, inv in reversed(items):  # sitk applies the last added first
        comp.AddTransform(_read_one(path, inv))
    return comp
