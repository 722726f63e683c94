"""NiftyReg baseline: ``reg_aladin`` (block-matching affine) then ``reg_f3d`` (cubic B-spline FFD).

The binaries come from the PyPI package ``niftyreg`` (it compiles them at
install time: ``CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install niftyreg``, about
3 min) or from ``reg_aladin`` / ``reg_f3d`` / ``reg_transform`` on ``PATH``.

Settings: NiftyReg's defaults, which is how the paper ran it.  ``reg_aladin``:
rigid then affine, 3 levels, block matching with 50 % of the blocks;
``reg_f3d``: NMI (64 bins), control-point spacing 5 voxels, bending energy
0.001, 3 levels, at most 150 iterations per level, initialised with the
aladin affine.  Inputs are avsm's working inputs (canonical ≈2 mm grids,
intensities in [0, 1]) written as NIfTI.

Conversion to avsm's convention: ``reg_transform -def`` turns the control-point
grid (which already contains the affine) into a deformation field on the fixed
working grid whose vectors are **absolute floating-image positions in NIfTI
RAS world mm** (the peer-tools notes); RAS → LPS negates x and y.  The affine
file maps reference world → floating world (a pull-back, like avsm's maps), in
RAS: ``M_LPS = F M_RAS F`` with ``F = diag(-1, -1, 1, 1)``.  No inverse is
given (``reg_f3d`` without ``-sym``); the paper's inverse-consistency measure
uses both directions' forward maps.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from avsm.baselines.base import FieldResult, MethodUnavailable, WorldTransform, run_tool, tool_threads, working_inputs
from avsm.io.image import Volume

__all__ = ["niftyreg", "niftyreg_binary", "RAS_FLIP"]

log = logging.getLogger(__name__)

#: RAS <-> LPS flip of homogeneous world coordinates (its own inverse).
RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def niftyreg_binary(name: str) -> str:
    """Full path of a NiftyReg executable (``reg_f3d`` ...).

    Raises:
        MethodUnavailable: neither the ``niftyreg`` package nor ``PATH`` has it.
    """
    try:
        import niftyreg  # type: ignore[import-not-found]

        cand = Path(str(niftyreg.bin_path)) / name
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise MethodUnavailable(
        f"niftyreg: {name} not found (install with `CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install niftyreg`)")




def _read_ras_affine(path: Path) -> np.ndarray:
    M = np.loadtxt(path, dtype=np.float64)
    if M.shape != (4, 4):
        raise RuntimeError(f"{path}: expected a 4x4 affine, got shape {M.shape}")
    return M


def niftyreg(
    fixed: Volume,
    moving: Volume,
    *,
    spacing: float | None = 2.0,
    threads: int | None = None,
    control_point_spacing: float = -5.0,
    bending_energy: float = 0.001,
    levels: int = 3,
    max_iterations: int = 150,
    keep_warped: bool = False,
    **_: Any,
) -> FieldResult:
    """``reg_aladin`` + ``reg_f3d`` on the working pair.

    Args:
        fixed, moving: intensity volumes (any geometry).
        spacing: working-grid spacing in mm.
        threads: OpenMP threads (default ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` or 2).
        control_point_spacing: ``-sx``; negative values are voxels (NiftyReg's default −5).
        bending_energy: ``-be``.
        levels: ``-ln`` pyramid levels.
        max_iterations: ``-maxit`` per level.
        keep_warped: keep NiftyReg's own warped image (``reg_f3d -res``) in
            ``info['tool_warped']`` on the fixed working grid (for tests).

    Returns:
        :class:`FieldResult` without inverse.
    """
    aladin, f3d, rtrans = (niftyreg_binary(n) for n in ("reg_aladin", "reg_f3d", "reg_transform"))
    n_thr = tool_threads(threads)
    t0 = time.perf_counter()
    fw, mw = working_inputs(fixed, moving, spacing)
    timings = {"prepare": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory(prefix="avsm-niftyreg-") as tmp:
        d = Path(tmp)
        sitk.WriteImage(sitk.Cast(fw.to_sitk(), sitk.sitkFloat32), str(d / "fixed.nii.gz"))
        sitk.WriteImage(sitk.Cast(mw.to_sitk(), sitk.sitkFloat32), str(d / "moving.nii.gz"))
        omp = ["-omp", str(n_thr)]
        t1 = time.perf_counter()
        run_tool([aladin, "-ref", "fixed.nii.gz", "-flo", "moving.nii.gz", "-aff", "aff.txt",
              "-res", "aff_res.nii.gz", *omp], tmp)
        timings["affine"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        run_tool([f3d, "-ref", "fixed.nii.gz", "-flo", "moving.nii.gz", "-aff", "aff.txt", "-cpp", "cpp.nii.gz",
              "-res", "res.nii.gz", "-sx", str(control_point_spacing), "-be", str(bending_energy),
              "-ln", str(int(levels)), "-maxit", str(int(max_iterations)), *omp], tmp)
        timings["f3d"] = time.perf_counter() - t2
        run_tool([rtrans, "-ref", "fixed.nii.gz", "-def", "cpp.nii.gz", "def.nii.gz"], tmp)
        A = RAS_FLIP @ _read_ras_affine(d / "aff.txt") @ RAS_FLIP
        dfield = _deformation_to_lps_displacement(d / "def.nii.gz", fw)
        info: dict[str, Any] = {"control_point_spacing": control_point_spacing,
                                "bending_energy": bending_energy, "levels": levels}
        if keep_warped:  # NiftyReg's own resampling, linear with zero padding (reg_f3d -res is cubic, NaN-padded)
            run_tool([niftyreg_binary("reg_resample"), "-ref", "fixed.nii.gz", "-flo", "moving.nii.gz", "-trans",
                  "cpp.nii.gz", "-res", "res_lin.nii.gz", "-inter", "1", "-pad", "0", *omp], tmp)
            info["tool_warped"] = Volume(sitk.GetArrayFromImage(sitk.ReadImage(str(d / "res_lin.nii.gz"))).astype(
                np.float32), fw.grid)
            info["fixed_work"], info["moving_work"] = fw, mw
    timings["total"] = time.perf_counter() - t0
    return FieldResult(fixed.grid, moving.grid,
                       WorldTransform(affine=np.eye(4), field_grid=fw.grid, field=dfield), None,
                       affine_forward=A, method="niftyreg", timings=timings, info=info)


def _deformation_to_lps_displacement(path: Path, fixed_w: Volume) -> np.ndarray:
    """World LPS displacement ``(3, D, H, W)`` from NiftyReg's RAS deformation field file.

    The file holds, for every fixed working voxel, the absolute floating position
    (RAS mm); SimpleITK reads it either as a vector image or as a 5-D scalar
    image ``(x, y, z, t=1, 3)``.
    """
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    shape = fixed_w.grid.shape
    if img.GetNumberOfComponentsPerPixel() == 3:  # (z, y, x, 3)
        pos = np.moveaxis(arr.reshape(*shape, 3), -1, 0)
    else:  # 5-D scalar (3, 1, z, y, x) in numpy order
        pos = arr.reshape(3, *shape)
    if pos.shape != (3, *shape):
        raise RuntimeError(f"{path}: deformation field of shape {arr.shape} does not match the grid {shape}")
    pos = pos.copy()
    pos[0] *= -1.0  # RAS -> LPS
    pos[1] *= -1.0
    from avsm.transform import grid_world_points

    x = grid_world_points(fixed_w.grid)[0].numpy()
    return pos - x
