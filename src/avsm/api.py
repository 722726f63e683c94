"""Python API: register two images, warp images and labels, get maps in world space.

This module is the bridge between world geometry (:mod:`avsm.io`) and the
unit-cube core (:mod:`avsm.core`).  A registration runs on *working grids*:
each image's own physical box, re-indexed to a canonical orientation
(tensor axes ≈ S-I, A-P, L-R) and resampled to about 2 mm (sizes a multiple
of 16).  The map starts from the **physical identity** (the affine that takes
fixed unit coordinates to moving unit coordinates through the world), so
images in different orientations, spacings and positions start aligned as
their headers say.  Results are returned on the **fixed image's own grid**.

Example::

    import avsm
    fixed = avsm.load_image("fixed.nii.gz")
    moving = avsm.load_image("moving.nii.gz")
    result = avsm.register(fixed=fixed, moving=moving, method="opt")
    warped = result.warp(moving)                      # on fixed's grid
    labels = result.warp(avsm.load_image("seg.nii.gz", label=True))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from avsm.core.coords import affine_map, homogeneous_to_centred, invert_affine
from avsm.core.jacobian import jacobian_determinant
from avsm.core.sampling import compose
from avsm.errors import AvsmError
from avsm.io.geometry import Grid, unit_affine_between
from avsm.io.image import Volume, normalize_intensity, resample
from avsm.models.vsvf import VSVF
from avsm.optim.affine_opt import AffineOptConfig, optimise_affine
from avsm.optim.vsvf_opt import VSVFOptConfig, optimise_vsvf
from avsm.transform import WorldMapTransform, apply_homogeneous, grid_affine_map

log = logging.getLogger(__name__)

METHODS = ("affine", "opt", "net", "net+opt")


@dataclass
class PreparedPair:
    """A pair ready for the core: normalised tensors on canonical working grids.

    Attributes:
        fixed, moving: the original volumes.
        fixed_grid, moving_grid: working grids (same boxes, canonical axes).
        fixed_t, moving_t: ``(1, 1, D, H, W)`` float32 intensities in [0, 1].
        A0, b0: ``(1, 3, 3)``, ``(1, 3)`` physical-identity centred affine,
            fixed working unit → moving working unit coordinates.
    """

    fixed: Volume
    moving: Volume
    fixed_grid: Grid
    moving_grid: Grid
    fixed_t: torch.Tensor
    moving_t: torch.Tensor
    A0: torch.Tensor
    b0: torch.Tensor


def working_grid_for(grid: Grid, *, spacing: float | None = 2.0, shape: Sequence[int] | None = None,
                     multiple_of: int = 16) -> Grid:
    """Canonical working grid over ``grid``'s box (see :meth:`Grid.working_grid`)."""
    return grid.canonical().working_grid(spacing_mm=spacing, shape=tuple(shape) if shape else None,
                                         multiple_of=multiple_of, min_size=multiple_of)


def to_working(volume: Volume, grid: Grid) -> np.ndarray:
    """Normalise intensities (0.1/99.9 percentiles → [0, 1]) and resample onto ``grid``.

    Downsampling is preceded by a Gaussian blur (σ = half the spacing increase, per axis).
    """
    img = volume.with_array(normalize_intensity(volume.array))
    sim = img.to_sitk()
    sig = [0.5 * max(ws - s, 0.0) for ws, s in zip(_axis_spacing_in(volume.grid, grid), volume.grid.spacing)]
    if max(sig) > 0:
        sim = sitk.SmoothingRecursiveGaussian(sim, [max(s, 1e-3) for s in sig])
        img = Volume.from_sitk(sim, path=volume.path)
    return resample(img, grid, interpolation="linear").array.astype(np.float32)


def _axis_spacing_in(src: Grid, dst: Grid) -> list[float]:
    """Spacing of ``dst`` expressed along ``src``'s ITK axes (mm)."""
    Ds = np.asarray(src.direction).reshape(3, 3)
    Dd = np.asarray(dst.direction).reshape(3, 3)
    # each src axis aligns best with some dst axis; take that axis' spacing
    out = []
    for k in range(3):
        j = int(np.argmax(np.abs(Dd.T @ Ds[:, k])))
        out.append(dst.spacing[j])
    return out


def prepare_pair(
    fixed: Volume,
    moving: Volume,
    *,
    spacing: float | None = 2.0,
    shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> PreparedPair:
    """Working grids, normalised tensors and the physical-identity initial affine."""
    fg = working_grid_for(fixed.grid, spacing=spacing, shape=shape)
    mg = working_grid_for(moving.grid, spacing=spacing, shape=shape)
    ft = torch.from_numpy(to_working(fixed, fg))[None, None].to(device)
    mt = torch.from_numpy(to_working(moving, mg))[None, None].to(device)
    M = torch.as_tensor(unit_affine_between(fg, mg), dtype=torch.float64).unsqueeze(0)
    A0, b0 = homogeneous_to_centred(M)
    return PreparedPair(fixed, moving, fg, mg, ft, mt, A0.float().to(device), b0.float().to(device))


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

    def world_map(self, grid: Grid | None = None, *, inverse: bool = False,
                  affine_only: bool = False) -> torch.Tensor:
        """World (LPS mm) point that each voxel of ``grid`` maps to, ``(1, 3, *grid.shape)`` float64.

        Forward: ``grid`` is in the fixed image's space (default: the fixed image's
        own grid) and the values are points in the moving image.  ``inverse``
        swaps the roles (default grid: the moving image's own grid).
        """
        src, dst = (self.moving_grid, self.fixed_grid) if inverse else (self.fixed_grid, self.moving_grid)
        if grid is None:
            grid = self.moving_original if inverse else self.fixed_original
        if inverse:
            if affine_only:
                Ai, bi = invert_affine(self.A.double(), self.b.double())
                phi = affine_map(Ai, bi, src.shape)
            else:
                phi = self.phi_inv.double()
        else:
            phi = (self.phi_affine if affine_only else self.phi).double()
        inner = grid_affine_map(src.world_to_unit() @ grid.unit_to_world(), grid.shape,
                                device=phi.device)
        unit = compose(phi, inner)
        return apply_homogeneous(dst.unit_to_world(), unit)

    def folds(self) -> int:
        """Voxels with ``det J < 0`` on the fixed working grid (the registration's own grid)."""
        return int((jacobian_determinant(self.phi.double()) < 0).sum())


def _load_net(model: Any, device: torch.device | str) -> Any:
    from avsm.models.pretrained import load_pretrained  # local: networks only when asked

    if model is None or isinstance(model, str):
        return load_pretrained(model, device=device)
    return model.to(device)


def register(
    *,
    fixed: Volume,
    moving: Volume,
    method: str = "net",
    spacing: float | None = None,
    shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    affine_config: AffineOptConfig | None = None,
    vsvf_config: VSVFOptConfig | None = None,
    model: Any = None,
    affine_steps: int | None = None,
    vsvf_steps: int | None = None,
    refine_iterations: int = 20,
    progress: bool = True,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: intensity volumes (any geometry; see :func:`avsm.io.load_image`).
        method: ``net`` (AVSM network, pretrained by default), ``opt`` (affine-opt
            then vSVF-opt), ``affine`` (affine-opt only) or ``net+opt`` (network,
            then ``refine_iterations`` L-BFGS iterations of vSVF-opt at full scale).
        spacing, shape: working grid (default 2 mm for ``opt``; the model's own for ``net``).
        device: ``cpu`` or ``cuda``.
        affine_config, vsvf_config: optimisation settings.
        model: a loaded :class:`avsm.models.avsm.AVSM`, a weights path, or ``None`` (bundled).
        affine_steps, vsvf_steps: test-time steps of the network.
        progress: tqdm bars.
    """
    if method not in METHODS:
        raise AvsmError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    timings: dict[str, float] = {}
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    net = None
    if method in ("net", "net+opt"):
        net = _load_net(model, device)
        net.eval()
        if spacing is None and shape is None:
            spacing = net.config.working_spacing
    if spacing is None and shape is None:
        spacing = max(2.0, min(fixed.grid.spacing))  # never upsample a coarse image
    pair = prepare_pair(fixed, moving, spacing=spacing, shape=shape, device=device)
    timings["prepare"] = time.perf_counter() - t0
    f, m = pair.fixed_t, pair.moving_t
    t1 = time.perf_counter()
    if method in ("affine", "opt"):
        A, b = optimise_affine(f, m, pair.A0, pair.b0, affine_config, progress=progress)
        timings["affine"] = time.perf_counter() - t1
        phi_affine = affine_map(A, b, pair.fixed_grid.shape)
        Ai, bi = invert_affine(A, b)
        if method == "affine":
            phi = phi_affine
            phi_inv = affine_map(Ai, bi, pair.moving_grid.shape)
        else:
            t2 = time.perf_counter()
            res = optimise_vsvf(f, m, phi_affine, vsvf_config, progress=progress)
            timings["vsvf"] = time.perf_counter() - t2
            phi = res.phi
            with torch.no_grad():
                phi_inv = res.model.inverse([res.velocity], affine_map(Ai, bi, pair.moving_grid.shape))
    else:
        assert net is not None
        with torch.no_grad():
            out = net(m, f, pair.A0, pair.b0, affine_steps=affine_steps, vsvf_steps=vsvf_steps)
        A, b = out.A, out.b
        phi_affine = affine_map(A, b, pair.fixed_grid.shape)
        Ai, bi = invert_affine(A, b)
        phi = out.phi
        vs: VSVF = net.vsvf_for(pair.fixed_grid.shape)
        with torch.no_grad():
            phi_inv = vs.inverse(out.velocities, affine_map(Ai, bi, pair.moving_grid.shape))
        timings["network"] = time.perf_counter() - t1
        if method == "net+opt":
            t2 = time.perf_counter()
            cfg = vsvf_config or VSVFOptConfig(scales=(1.0,), iterations=(refine_iterations,))
            res = optimise_vsvf(f, m, phi, cfg, progress=progress)
            phi = res.phi
            with torch.no_grad():
                phi_inv = res.model.inverse([res.velocity], phi_inv)
            timings["refine"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    if affine_config is not None:
        info["affine_history"] = affine_config.history
    if vsvf_config is not None:
        info["vsvf_history"] = vsvf_config.history
    return RegistrationResult(
        fixed_grid=pair.fixed_grid, moving_grid=pair.moving_grid,
        fixed_original=fixed.grid, moving_original=moving.grid,
        A=A.detach().cpu(), b=b.detach().cpu(), phi=phi.detach().cpu(), phi_inv=phi_inv.detach().cpu(),
        phi_affine=phi_affine.detach().cpu(), method=method, timings=timings, info=info,
    )


def identity_result(fixed: Volume, moving: Volume, *, spacing: float = 2.0) -> RegistrationResult:
    """The physical-identity 'registration' (no optimisation); a reference for metrics."""
    fg = working_grid_for(fixed.grid, spacing=spacing)
    mg = working_grid_for(moving.grid, spacing=spacing)
    M = torch.as_tensor(unit_affine_between(fg, mg), dtype=torch.float64).unsqueeze(0)
    A, b = homogeneous_to_centred(M)
    Ai, bi = invert_affine(A, b)
    phi = affine_map(A, b, fg.shape).float()
    return RegistrationResult(fg, mg, fixed.grid, moving.grid, A.float(), b.float(), phi,
                              affine_map(Ai, bi, mg.shape).float(), phi, "identity")
