"""Conversions between ITK/SimpleITK transforms and avsm world transforms (LPS, mm)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from avsm.export.itk import sitk_affine_matrix
from avsm.io.geometry import Grid

__all__ = ["sitk_affine_matrix", "read_displacement_field", "itk_affine_file_matrix"]


def itk_affine_file_matrix(path: str) -> np.ndarray:
    """``(4, 4)`` world matrix of an ITK affine transform file (``.mat``/``.txt``)."""
    return sitk_affine_matrix(sitk.ReadTransform(path))


def read_displacement_field(path: str) -> tuple[Grid, np.ndarray]:
    """Read an ITK displacement field (vector image, LPS mm).

    Returns:
        ``(grid, field)`` with ``field`` of shape ``(3, *grid.shape)`` float64,
        channels x, y, z (world LPS displacements).
    """
    img = sitk.ReadImage(path)
    if img.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(f"{path}: not a 3-D displacement field")
    return displacement_from_sitk(img)


def displacement_from_sitk(img: sitk.Image) -> tuple[Grid, np.ndarray]:
    """``(grid, (3, D, H, W) float64 field)`` from a SimpleITK vector image."""
    arr = sitk.GetArrayFromImage(img).astype(np.float64)  # (z, y, x, 3)
    return Grid.from_sitk(img), np.ascontiguousarray(np.moveaxis(arr, -1, 0))
