"""Reading and validating binary masks (e.g. a region of interest for a similarity).

A mask is a 3-D image file holding only the values 0 and 1 (any integer dtype,
or a float file whose values are exactly 0.0 and 1.0), on the same grid as the
image it belongs to.  Every problem is reported as an
:class:`avsm.errors.AvsmError` whose one-line message names the mask file.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from avsm.errors import AvsmError
from avsm.io.geometry import Grid
from avsm.io.image import Volume, _read_sitk, _to_3d, check_same_geometry

__all__ = ["load_mask"]

#: How many distinct values an error message lists.
_MAX_VALUES_LISTED: int = 8


def _value_text(v: float | int, floating: bool) -> str:
    return f"{float(v):g}" if floating else str(int(v))


def load_mask(path: str | os.PathLike[str], reference: Volume) -> Volume:
    """Read a binary mask that must lie on ``reference``'s grid.

    Args:
        path: mask image file (any format :func:`avsm.io.image.load_image`
            reads; DICOM folders are refused).
        reference: the image the mask belongs to; the mask's grid must match
            it within the tolerance of :func:`avsm.io.image.check_same_geometry`
            (shape exactly; spacing and origin within 1e-3 mm; direction
            cosines within 1e-3).

    Returns:
        A label :class:`Volume` (``is_label=True``) with a ``uint8`` 0/1 array on
        ``reference.grid`` exactly (the mask's own grid differs from it by at
        most the tolerance above); ``path`` is the mask file.

    Raises:
        AvsmError: one line naming the mask file: missing, unreadable, corrupt
            or truncated file; a directory; a vector, complex or non-3-D image;
            NaN/Inf voxels; a grid other than the reference's; values other than
            0 and 1 (the message lists the values found); no voxel equal to 1.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise AvsmError("mask file not found", p)
    if os.path.isdir(p):
        raise AvsmError("is a directory, not a mask file", p)
    if not os.access(p, os.R_OK):
        raise AvsmError("mask file is not readable (permission denied)", p)

    img = _read_sitk(p, "mask")
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise AvsmError(
            f"mask is a vector image with {ncomp} components per voxel; expected a scalar 3-D mask", p
        )
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise AvsmError("mask is complex-valued; expected a binary 3-D mask", p)
    img = _to_3d(img, p)
    try:
        grid = Grid.from_sitk(img)
    except ValueError as e:
        raise AvsmError(f"invalid mask geometry: {e}", p) from e
    arr = sitk.GetArrayFromImage(img)
    mask = Volume(arr, grid, p, is_label=True)

    try:
        check_same_geometry(reference, mask)
    except AvsmError as e:
        problem = e.problem
        if problem.startswith("label map "):
            problem = "mask " + problem[len("label map ") :]
        raise AvsmError(problem, p) from e

    floating = bool(np.issubdtype(arr.dtype, np.floating))
    zero = arr == 0
    one = arr == 1
    bad = ~(zero | one)
    if bad.any():
        others = np.unique(arr[bad])
        found = [v for v, present in ((0, zero.any()), (1, one.any())) if present]
        values = sorted(found + others.tolist(), key=lambda v: (v != v, v))  # NaN last
        shown = ", ".join(_value_text(v, floating) for v in values[:_MAX_VALUES_LISTED])
        if len(values) > _MAX_VALUES_LISTED:
            shown += f", ... ({len(values)} distinct values)"
        raise AvsmError(f"mask has values other than 0 and 1 (found {shown}); expected a binary 0/1 mask", p)
    if not one.any():
        raise AvsmError("mask is empty (no voxel equals 1)", p)
    return Volume(one.astype(np.uint8), reference.grid, p, is_label=True)
