"""ITK HDF5 composite transforms (``--format h5``), as ``antsRegistration --write-composite-transform 1``.

Two files for a prefix ``P`` (conventions of :mod:`avsm.export.itk`: pull-backs in LPS mm):

=============================  ================================================================
``PComposite.h5``              fixed point -> moving point: ``total(x) = Affine(x + d(x))``
``PInverseComposite.h5``       moving point -> fixed point: ``total^-1(y) = z + e(z)``, ``z = Affine^-1(y)``
=============================  ================================================================

Layout, as ITK's ``HDF5TransformIO`` writes an ``itk::CompositeTransform`` (checked against
``sitk.WriteTransform`` of a ``sitk.CompositeTransform``, ITK 5.4)::

    /ITKVersion, /HDFVersion, /OSName, /OSVersion      (1,) variable-length ASCII strings
    /TransformGroup/0/TransformType                    "CompositeTransform_double_3_3"
    /TransformGroup/1/TransformType                    first transform of the queue (applied LAST)
    /TransformGroup/1/TransformParameters              float64
    /TransformGroup/1/TransformFixedParameters         float64
    /TransformGroup/2/...                              second transform (applied FIRST to a point)

ITK applies the last transform of the queue first, so ``PComposite.h5`` holds
``[AffineTransform_double_3_3, DisplacementFieldTransform_double_3_3]`` (the warp ``d``
acts first), exactly the order antsRegistration writes, and ``PInverseComposite.h5``
holds ANTs' inverse order ``[DisplacementFieldTransform (inverse warp e), AffineTransform
(inverse affine)]`` (the inverse affine acts first).

* ``AffineTransform_double_3_3``: parameters = the 3x3 matrix (row-major) then the
  translation (12 values), fixed parameters = the centre (3 values, mm; the fixed image's
  centre, as in ``P0GenericAffine.mat``).
* ``DisplacementFieldTransform_double_3_3``: fixed parameters = size ``(X, Y, Z)``, origin
  (mm), spacing (mm), direction (row-major 9): 18 values; parameters = the LPS mm
  displacement vectors, ``3 * X * Y * Z`` values, voxel ``x`` fastest and the three
  components of a voxel adjacent (ITK's buffer order).  Between nodes ITK interpolates
  linearly and reads zero displacement outside the grid.

The forward warp ``d(x) = Affine^-1(total(x)) - x`` lives on the fixed image's own grid
(as antsRegistration writes it), so at the fixed voxel centres the file is exact up to the
float32 evaluation of the map (about 3e-5 mm).  The inverse warp ``e`` does **not** live on
the fixed grid as in ANTs, but on the moving image's grid carried back by the inverse
affine (node ``ijk`` at ``Affine^-1(y_ijk)``, ``y_ijk`` the moving voxel centres: origin
and spacing from that mapping, and a direction matrix that is not orthonormal when the
affine scales or shears).  Resampling onto the moving image's grid then reads ``e``
exactly at its nodes, in ITK/ANTs as in nitransforms (which interpolates off-node
points with cubic splines and treats a border band as "no displacement"); on the fixed
grid the inverse would be interpolated off its nodes (about 2e-3 relative intensity
error on the test fixture).  The grid covers exactly the moving image's box, which is
where avsm's inverse map is defined; outside it the inverse reads as the inverse affine.

Written with ``h5py`` rather than ``sitk.WriteTransform``: SimpleITK would need the field
as a float64 ``sitk.Image`` (a second full-resolution copy, twice the float32 field) before
ITK serialises it, whereas here the contiguous float64 ``TransformParameters`` dataset is
filled slab by slab (:func:`avsm.transform.slab_ranges`): no full-resolution field is ever
held in memory (a precomputed ``warp`` is read slab by slab).  The stored values are double,
as antsRegistration writes them (the file is 24 bytes per voxel per field).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import h5py
import numpy as np
import SimpleITK as sitk
import torch

from avsm.errors import AvsmError
from avsm.export.itk import ROLES, _affine_image_grid, affine_to_sitk, field_slab, world_affine
from avsm.io.geometry import Grid
from avsm.io.outputs import OutputTransaction
from avsm.transform import apply_homogeneous, slab_ranges
from avsm.transform import grid_world_points as _world_points

if TYPE_CHECKING:
    from avsm.transform import RegistrationResult

__all__ = [
    "H5_ROLES",
    "COMPOSITE_TYPE",
    "AFFINE_TYPE",
    "FIELD_TYPE",
    "field_fixed_parameters",
    "inverse_field_grid",
    "write_h5_composites",
    "write_itk_composite_h5",
]

log = logging.getLogger(__name__)

#: roles of :func:`write_h5_composites` (keys of :data:`avsm.export.itk.ROLES`).
H5_ROLES: tuple[str, str] = ("composite_h5", "inverse_composite_h5")

COMPOSITE_TYPE = "CompositeTransform_double_3_3"
AFFINE_TYPE = "AffineTransform_double_3_3"
FIELD_TYPE = "DisplacementFieldTransform_double_3_3"

#: fills the field of a slab: ``(z0, z1) -> (3, z1 - z0, H, W)`` LPS mm displacement.
SlabFn = Callable[[int, int], np.ndarray]

#: one transform of a composite: ``(type name, fixed parameters, parameters or (grid, fill))``.
Entry = tuple[str, np.ndarray, np.ndarray | tuple[Grid, SlabFn]]

_STR = h5py.string_dtype("ascii")  # ITK: variable-length, NUL-terminated ASCII


def field_fixed_parameters(grid: Grid) -> np.ndarray:
    """ITK ``DisplacementFieldTransform`` fixed parameters of a field on ``grid``.

    Returns:
        ``(18,)`` float64: size ``(X, Y, Z)`` (voxels), origin (mm), spacing (mm),
        direction (row-major 3x3), ITK axis order.
    """
    return np.concatenate([np.asarray(grid.itk_size, dtype=np.float64), np.asarray(grid.origin),
                           np.asarray(grid.spacing), np.asarray(grid.direction)]).astype(np.float64)


def inverse_field_grid(result: RegistrationResult, M: np.ndarray | None = None) -> Grid:
    """Grid of the inverse warp in ``PInverseComposite.h5``: the moving grid under ``Affine^-1``.

    Node ``ijk`` sits at ``M^-1 @ moving.index_to_world() @ ijk``; spacing = the column
    norms, direction = the normalised columns (not orthonormal for a scaling/shearing affine).

    Args:
        result: the registration (``result.moving_original`` is mapped).
        M: ``(4, 4)`` world affine (default :func:`avsm.export.itk.world_affine`).
    """
    M = world_affine(result) if M is None else np.asarray(M, dtype=np.float64)
    return _affine_image_grid(np.linalg.inv(M), result.moving_original)


def _string(group: h5py.Group, name: str, text: str) -> None:
    group.create_dataset(name, shape=(1,), dtype=_STR, data=np.array([text.encode("ascii", "replace")],
                                                                     dtype=object))


def _affine_entry(M: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ITK ``AffineTransform`` (parameters ``(12,)``, fixed ``(3,)``) equal to world matrix ``M``."""
    tr = affine_to_sitk(M, tuple(float(c) for c in centre))
    return np.asarray(tr.GetParameters(), dtype=np.float64), np.asarray(tr.GetFixedParameters(), dtype=np.float64)


def write_itk_composite_h5(path: str, transforms: Sequence[Entry], final: str | None = None) -> None:
    """Write an ITK HDF5 ``CompositeTransform_double_3_3`` file.

    Args:
        path: file to write (e.g. ``tx.path(final)``).
        transforms: the composite's queue in ITK order (the **last** is applied first to a
            point), each ``(type name, fixed parameters, parameters)``; a displacement
            field's parameters may be ``(grid, fill)`` with ``fill(z0, z1)`` returning its
            ``(3, z1 - z0, H, W)`` LPS mm slab, written slab by slab.
        final: the path named in errors (default ``path``).

    Raises:
        AvsmError: the file cannot be written.
    """
    try:
        with h5py.File(path, "w") as f:
            v = sitk.Version
            _string(f, "ITKVersion", f"{v.ITKMajorVersion()}.{v.ITKMinorVersion()}.{v.ITKPatchVersion()}")
            _string(f, "HDFVersion", f"HDF5 library version: {h5py.version.hdf5_version}")
            _string(f, "OSName", platform.system())
            _string(f, "OSVersion", platform.release())
            group = f.create_group("TransformGroup")
            _string(group.create_group("0"), "TransformType", COMPOSITE_TYPE)
            for i, (kind, fixed, params) in enumerate(transforms, start=1):
                g = group.create_group(str(i))
                _string(g, "TransformType", kind)
                g.create_dataset("TransformFixedParameters", data=np.asarray(fixed, dtype=np.float64))
                if isinstance(params, np.ndarray):
                    g.create_dataset("TransformParameters", data=params.astype(np.float64))
                    continue
                grid, fill = params
                _, H, W = grid.shape
                ds = g.create_dataset("TransformParameters", shape=(3 * grid.num_voxels,), dtype=np.float64)
                for z0, z1 in slab_ranges(grid):
                    slab = np.asarray(fill(z0, z1))
                    if slab.shape != (3, z1 - z0, H, W):
                        raise ValueError(f"field slab {z0}:{z1} has shape {slab.shape}")
                    ds[3 * H * W * z0:3 * H * W * z1] = np.moveaxis(slab, 0, -1).astype(np.float64).reshape(-1)
    except OSError as e:
        raise AvsmError(f"cannot write HDF5 transform: {e}", final or path) from e


def write_h5_composites(
    result: RegistrationResult,
    prefix: str,
    tx: OutputTransaction,
    *,
    M: np.ndarray | None = None,
    dtype: str = "float32",
    warp: np.ndarray | None = None,
) -> dict[str, str]:
    """Write ``PComposite.h5`` and ``PInverseComposite.h5`` (module docstring) through ``tx``.

    Args:
        result: the registration.
        prefix: output prefix ``P``.
        tx: the run's output transaction (files appear when it commits).
        M: ``(4, 4)`` world affine, fixed mm -> moving mm (default :func:`world_affine`).
        dtype: precision of the map evaluation, ``"float32"`` (about 3e-5 mm) or
            ``"float64"``; the files always store float64, as ITK's double transforms.
        warp: the ``(3, *fixed.shape)`` ANTs warp ``d`` (LPS mm) when already computed
            (e.g. by :func:`avsm.pipeline.forward_outputs`); read, not modified or kept.

    Returns:
        ``{"composite_h5": final path, "inverse_composite_h5": final path}``.

    Raises:
        AvsmError: a file cannot be written.
    """
    tdtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if tdtype is None:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    M = world_affine(result) if M is None else np.asarray(M, dtype=np.float64)
    Minv = np.linalg.inv(M)
    fixed, moving = result.fixed_original, result.moving_original
    centre = (fixed.unit_to_world() @ np.array([0.5, 0.5, 0.5, 1.0]))[:3]
    if warp is not None and tuple(warp.shape) != (3, *fixed.shape):
        raise ValueError(f"warp has shape {warp.shape}; expected {(3, *fixed.shape)}")

    def forward(z0: int, z1: int) -> np.ndarray:
        if warp is not None:
            return warp[:, z0:z1]
        return field_slab(result, "warp", fixed.slab(z0, z1), M, dtype=tdtype)

    def inverse(z0: int, z1: int) -> np.ndarray:
        # node ijk of the inverse grid is Minv(y_ijk): e = total^-1(y) - Minv(y)
        ms = moving.slab(z0, z1)
        y = _world_points(ms, torch.float64)
        back = result.world_map(ms, inverse=True, dtype=tdtype).double()
        return (back - apply_homogeneous(Minv, y))[0].numpy()

    fwd_params, fwd_fixed = _affine_entry(M, centre)
    inv_params, inv_fixed = _affine_entry(Minv, centre)
    inv_grid = inverse_field_grid(result, M)  # same shape as the moving grid, node ijk = Minv(y_ijk)
    D = inv_grid.direction_matrix
    log.debug("inverse warp grid: direction off orthonormal by %.2e", float(np.abs(D.T @ D - np.eye(3)).max()))
    out: dict[str, str] = {}
    specs: dict[str, list[Entry]] = {  # ITK queue order: the last entry acts first on a point
        "composite_h5": [(AFFINE_TYPE, fwd_fixed, fwd_params),
                         (FIELD_TYPE, field_fixed_parameters(fixed), (fixed, forward))],
        "inverse_composite_h5": [(FIELD_TYPE, field_fixed_parameters(inv_grid), (inv_grid, inverse)),
                                 (AFFINE_TYPE, inv_fixed, inv_params)],
    }
    for role, transforms in specs.items():
        final = os.fspath(prefix) + ROLES[role]
        write_itk_composite_h5(tx.path(final), transforms, final)
        out[role] = final
    return out
