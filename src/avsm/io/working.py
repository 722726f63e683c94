"""Working grids and working intensities: how any input image is brought to the registration.

Every method (optimisation, the networks, training data preparation) sees an image as
:func:`to_working` makes it on the grid :func:`working_grid_for` gives: the image's own
physical box in a canonical orientation, intensities in [0, 1] (MR: percentiles; CT: a fixed
Hounsfield window), anti-aliased before downsampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from avsm.io.geometry import Grid
from avsm.io.image import Volume, normalize_intensity, resample

__all__ = ["CT_WINDOW", "detect_modality", "normalise_ct", "to_working", "working_grid_for"]


def working_grid_for(grid: Grid, *, spacing: float | None = 2.0, shape: Sequence[int] | None = None,
                     multiple_of: int = 16, keep_thick_slices: bool = False) -> Grid:
    """Canonical working grid over ``grid``'s box (see :meth:`Grid.working_grid`).

    With ``keep_thick_slices`` an axis whose own spacing is coarser than ``spacing``
    keeps its own spacing (no slices are invented between thick CT slices).
    """
    can = grid.canonical()
    if keep_thick_slices and shape is None and spacing is not None and max(can.spacing) > spacing:
        per_axis = tuple(max(float(spacing), s) for s in can.spacing)
        return can.working_grid(spacing_mm=per_axis, multiple_of=multiple_of, min_size=multiple_of)
    return can.working_grid(spacing_mm=spacing, shape=tuple(shape) if shape else None,
                            multiple_of=multiple_of, min_size=multiple_of)


#: Hounsfield window of CT inputs: [-1000, 1000] HU → [0, 1] (see ``normalise_ct``)
CT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)


def detect_modality(volume: Volume) -> str:
    """``ct`` when the intensities look like Hounsfield units, else ``mr``.

    Rule: at least 2 % of the voxels at or below −900 (air, lung or the scanner's padding,
    −1024…−3024) and a 99th percentile above 0 (soft tissue at 0…100 HU, bone above).
    MR intensities are non-negative (or nearly so) and never reach −900.
    """
    a = volume.array
    sample = a.reshape(-1)[:: max(1, a.size // 2_000_000)]
    low = float(np.mean(sample <= -900.0))
    return "ct" if low >= 0.02 and float(np.percentile(sample, 99)) > 0.0 else "mr"


def normalise_ct(array: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Hounsfield units → [0, 1] by a fixed window, clamped: air and padding → 0.

    A fixed window (not percentiles) keeps one HU the same working intensity in every
    scan, whatever the field of view, padding value (−2048, −3024) or the share of air.
    """
    lo, hi = window
    return np.clip((array.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_working(volume: Volume, grid: Grid, modality: str = "mr",
               ct_window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Normalise intensities and resample onto ``grid``.

    MR (and anything not CT): 0.1/99.9 percentiles → [0, 1]; CT: the Hounsfield
    window ``ct_window`` → [0, 1].  Downsampling is preceded by a Gaussian blur
    (σ = half the spacing increase, per axis).
    """
    norm = normalise_ct(volume.array, ct_window) if modality == "ct" else normalize_intensity(volume.array)
    img = volume.with_array(norm)
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
