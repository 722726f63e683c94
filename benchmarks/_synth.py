"""Shared helpers of the synthetic and scale benchmarks: resampling and random smooth diffeomorphisms."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from avsm.baselines.base import WorldTransform, grid_world_points
from avsm.core.sampling import gaussian_blur
from avsm.io.geometry import Grid


def resample_to(img: sitk.Image, grid: Grid, label: bool) -> sitk.Image:
    """Resample a SimpleITK image onto ``grid`` (world identity; nearest for labels, blurred linear otherwise)."""
    if not label:
        sig = [max(0.5 * (g - s), 0.0) for g, s in zip(grid.spacing, img.GetSpacing())]
        if max(sig) > 0:
            img = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), [max(s, 1e-3) for s in sig])
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(img, grid.reference_image(img.GetPixelID()), sitk.Transform(), interp, 0.0,
                         img.GetPixelID())


def random_svf_transform(grid: Grid, rng: np.random.Generator, amplitude_mm: float = 4.0,
                         smooth_mm: float = 12.0, squarings: int = 6) -> WorldTransform:
    """A random smooth diffeomorphism ``x -> x + u(x)`` (world mm) by scaling and squaring a stationary velocity.

    Args:
        grid: grid the displacement is sampled on.
        rng: random generator.
        amplitude_mm: RMS of the velocity field (mm) after smoothing.
        smooth_mm: Gaussian sigma (mm) of the velocity field.
        squarings: scaling-and-squaring steps.

    Returns:
        A :class:`WorldTransform` with the displacement field (identity affine).
    """
    v = torch.from_numpy(rng.normal(size=(1, 3, *grid.shape)))
    sig = [smooth_mm / s for s in (grid.spacing[2], grid.spacing[1], grid.spacing[0])]  # tensor order
    v = gaussian_blur(v, sig)
    v = v * (amplitude_mm / float(v.pow(2).sum(1).mean().sqrt()))
    d = v / (2 ** squarings)
    pts = grid_world_points(grid)
    for _ in range(squarings):
        t = WorldTransform(field_grid=grid, field=d[0].numpy())
        d = t(pts + d) - pts  # d(x) + d(x + d(x))
    return WorldTransform(field_grid=grid, field=d[0].numpy())


def warp_sitk(img: sitk.Image, grid: Grid, transform: WorldTransform, label: bool) -> sitk.Image:
    """``img`` pulled back through ``transform`` onto ``grid`` (world points, SimpleITK interpolation)."""
    pts = transform(grid_world_points(grid))[0].numpy()  # (3, D, H, W) world
    disp = pts - grid_world_points(grid)[0].numpy()
    field = sitk.GetImageFromArray(np.moveaxis(disp, 0, -1).astype(np.float64), isVector=True)
    grid.apply_to(field)
    tx = sitk.DisplacementFieldTransform(field)
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(img, grid.reference_image(img.GetPixelID()), tx, interp, 0.0, img.GetPixelID())
