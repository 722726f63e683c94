"""Reading, validating, writing and resampling 3-D images (SimpleITK based).

Every problem with a user's file is reported as :class:`avsm.errors.AvsmError`
whose one-line message names the file.  Intensity images are returned as
``float32``; label maps keep an integer dtype.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import SimpleITK as sitk

from avsm.errors import AvsmError
from avsm.io.geometry import Grid
from avsm.io.outputs import OutputTransaction

__all__ = [
    "Volume",
    "load_image",
    "save_image",
    "normalize_intensity",
    "resample",
    "check_same_geometry",
    "SUPPORTED_EXTENSIONS",
]

logger = logging.getLogger(__name__)

#: File extensions known to work (others are passed to SimpleITK as they are).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

Interpolation = Literal["linear", "nearest", "bspline"]

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

_INT32 = np.iinfo(np.int32)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings (printed to stderr) for the duration of a read/write."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _itk_reason(err: Exception) -> str:
    """A short, one-line digest of a SimpleITK exception message."""
    text = str(err)
    if "Unable to determine ImageIO" in text:
        return "unknown file format or corrupt header"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    last = re.sub(r"^(sitk::ERROR:|ITK ERROR:|\[\w+\])\s*", "", last)
    last = re.sub(r"\w+ImageIO\(0x[0-9a-f]+\):\s*", "", last)
    return last[:160]


# --------------------------------------------------------------------------- Volume


@dataclass
class Volume:
    """A 3-D image array with its world geometry.

    Attributes:
        array: voxel values, shape ``grid.shape`` = ``(D, H, W)`` (numpy order of
            ``sitk.GetArrayFromImage``).  ``float32`` for intensity images,
            an integer dtype for label maps.
        grid: world geometry.
        path: file it was read from (used in error messages), or ``None``.
        is_label: ``True`` for a label map (nearest-neighbour resampling,
            integer dtype).
    """

    array: np.ndarray
    grid: Grid
    path: str | None = None
    is_label: bool = False

    def __post_init__(self) -> None:
        if self.array.ndim != 3 or tuple(self.array.shape) != self.grid.shape:
            raise ValueError(
                f"array shape {self.array.shape} does not match grid shape {self.grid.shape}"
            )

    @property
    def name(self) -> str:
        """The file path, or ``"<array>"`` for an in-memory volume."""
        return self.path if self.path is not None else "<array>"

    def to_sitk(self) -> sitk.Image:
        """SimpleITK image with this array and geometry (bool arrays become uint8)."""
        arr = self.array
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
        return self.grid.apply_to(img)

    @classmethod
    def from_sitk(cls, img: sitk.Image, path: str | None = None, is_label: bool = False) -> Volume:
        """Wrap a scalar 3-D SimpleITK image (array dtype kept as stored).

        Args:
            img: scalar 3-D image.
            path: file name for messages.
            is_label: whether the image is a label map.
        """
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("expected a scalar image")
        return cls(sitk.GetArrayFromImage(img), Grid.from_sitk(img), path, is_label)

    def with_array(self, array: np.ndarray, *, is_label: bool | None = None) -> Volume:
        """A copy with another array of the same shape (same grid and path)."""
        return replace(self, array=array, is_label=self.is_label if is_label is None else is_label)

    def canonical(self) -> Volume:
        """Same voxels re-indexed onto :meth:`Grid.canonical` (permute/flip, no interpolation)."""
        perm, flips = self.grid.canonical_axes()
        arr = np.transpose(self.array, perm)
        axes = [t for t in range(3) if flips[t]]
        if axes:
            arr = np.flip(arr, axis=axes)
        return replace(self, array=np.ascontiguousarray(arr), grid=self.grid.canonical())


# --------------------------------------------------------------------------- loading


_NIFTI_FLOAT_DTYPES = {16: "f4", 64: "f8"}  # NIfTI datatype code -> numpy float type


@dataclass(frozen=True)
class _NiftiLayout:
    endian: str
    vox_offset: int
    nvox: int
    itemsize: int
    datatype: int


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Voxel-data layout from a NIfTI-1 or NIfTI-2 header, or ``None`` if not NIfTI."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or not math.isfinite(vox_offset) or vox_offset < 0:
        return None
    nvox = 1
    for d in dims[1 : ndim + 1]:
        nvox *= max(int(d), 1)
    return _NiftiLayout(endian, int(vox_offset), nvox, bitpix // 8, int(datatype))


def _check_nifti_voxels(path: str, kind: str) -> None:
    """Stream a NIfTI file's voxel data once to catch what ITK hides.

    ITK's NIfTI reader silently zero-fills a truncated file and replaces NaN/Inf
    voxels by 0, so both are checked here on the raw bytes.
    """
    lower = path.lower()
    if lower.endswith(".nii.gz"):
        opener = gzip.open
    elif lower.endswith(".nii"):
        opener = open  # type: ignore[assignment]
    else:
        return
    try:
        with opener(path, "rb") as fh:
            header = fh.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                return  # not a NIfTI header: SimpleITK will report the problem
            if len(header) > layout.vox_offset:
                carry = header[layout.vox_offset :]
            else:
                skip = layout.vox_offset - len(header)
                carry = b""
                if len(fh.read(skip)) < skip:
                    raise AvsmError("file is truncated (no voxel data)", path)
            expected = layout.nvox * layout.itemsize
            ftype = _NIFTI_FLOAT_DTYPES.get(layout.datatype)
            ftype = layout.endian + ftype if ftype and layout.itemsize == int(ftype[1]) else None
            total = 0
            while total < expected:
                chunk = carry + fh.read(1 << 22)
                carry = b""
                if len(chunk) == 0:
                    break
                chunk = chunk[: expected - total]
                usable = len(chunk) - len(chunk) % layout.itemsize
                if ftype is not None and usable:
                    if not np.isfinite(np.frombuffer(chunk[:usable], dtype=ftype)).all():
                        raise AvsmError(f"{kind} contains NaN or Inf voxels", path)
                carry = chunk[usable:]
                total += usable
                if len(chunk) == len(carry):  # only a partial voxel left and EOF reached
                    break
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise AvsmError(f"file is truncated or corrupt (gzip: {e})", path) from e
    except OSError as e:
        raise AvsmError(f"cannot read file: {e.strerror or e}", path) from e
    if total < expected:
        raise AvsmError("file is truncated (fewer voxel bytes than the header declares)", path)


def _read_sitk(path: str, kind: str = "image") -> sitk.Image:
    _check_nifti_voxels(path, kind)
    try:
        with _quiet_itk():
            return sitk.ReadImage(path)
    except RuntimeError as e:
        raise AvsmError(f"cannot read image: {_itk_reason(e)}", path) from e


def _to_3d(img: sitk.Image, path: str) -> sitk.Image:
    dim = img.GetDimension()
    size = img.GetSize()
    if dim == 3:
        return img
    if dim == 4:
        if size[3] != 1:
            raise AvsmError(
                f"image is 4-D with {size[3]} volumes (size {'x'.join(map(str, size))}); "
                "expected a single 3-D volume",
                path,
            )
        extractor = sitk.ExtractImageFilter()
        extractor.SetSize([size[0], size[1], size[2], 0])
        extractor.SetIndex([0, 0, 0, 0])
        extractor.SetDirectionCollapseToStrategy(extractor.DIRECTIONCOLLAPSETOSUBMATRIX)
        try:
            return extractor.Execute(img)
        except RuntimeError as e:
            raise AvsmError(f"cannot reduce 4-D image to 3-D: {_itk_reason(e)}", path) from e
    raise AvsmError(
        f"image is {dim}-D (size {'x'.join(map(str, size))}); expected a 3-D volume", path
    )


def load_image(
    path: str | os.PathLike[str],
    *,
    label: bool = False,
    require_labels: bool = False,
    series: str | None = None,
) -> Volume:
    """Read and validate a 3-D image or label map.

    Formats: anything SimpleITK reads; ``.nii``, ``.nii.gz``, ``.nrrd``,
    ``.nhdr``, ``.mha`` and ``.mhd`` are tested.  A 4-D image whose last
    dimension is 1 is squeezed to 3-D.  A directory is read as a DICOM series
    (see :func:`avsm.io.dicom.read_dicom_series`: slices sorted along the slice
    normal, missing slices and uneven spacing refused), then validated like a file.

    Args:
        path: image file, or a folder holding a DICOM series.
        label: read as a label map (integer values, kept as an integer dtype;
            float-stored integral labels become ``int32``).
        require_labels: with ``label=True``, also reject a map without any
            non-zero label.
        series: for a DICOM folder, the SeriesInstanceUID of the series to read
            (required when the folder holds several); must be ``None`` for a file.

    Returns:
        A :class:`Volume`; ``array`` is ``float32`` ``(D, H, W)`` for an
        intensity image, an integer dtype for a label map.

    Raises:
        AvsmError: missing, unreadable, corrupt or truncated file; vector,
            complex, 2-D or (non-singleton) 4-D image; a dimension below 2
            voxels; NaN/Inf voxels; an all-zero or constant intensity image; a
            label map with non-integer values (or, with ``require_labels``, no
            labels); for a folder, every DICOM problem listed in
            :func:`avsm.io.dicom.read_dicom_series` (no series, several series
            and no ``series``, unknown ``series``, a single slice, missing
            slices or uneven slice spacing, ...); ``series`` given for a file.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise AvsmError("file not found", p)
    kind = "label map" if label else "image"
    if os.path.isdir(p):
        from avsm.io.dicom import read_dicom_series  # deferred: avsm.io.dicom imports this module

        img = read_dicom_series(p, series=series)
    else:
        if series is not None:
            raise AvsmError(
                f"series={series!r} selects a series in a DICOM folder, but this is a file", p
            )
        if not os.access(p, os.R_OK):
            raise AvsmError("file is not readable (permission denied)", p)
        img = _read_sitk(p, kind)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise AvsmError(
            f"vector image with {ncomp} components per voxel; expected a scalar 3-D image", p
        )
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise AvsmError("complex-valued image; expected a real scalar 3-D image", p)
    img = _to_3d(img, p)
    size = img.GetSize()
    if min(size) < 2:
        raise AvsmError(
            f"image is too thin (size {'x'.join(map(str, size))} voxels); "
            "every dimension needs at least 2 voxels",
            p,
        )
    try:
        grid = Grid.from_sitk(img)
    except ValueError as e:
        raise AvsmError(f"invalid image geometry: {e}", p) from e

    arr = sitk.GetArrayFromImage(img)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise AvsmError(f"{kind} contains NaN or Inf voxels", p)

    if label:
        if np.issubdtype(arr.dtype, np.floating):
            frac = arr[arr != np.round(arr)]
            if frac.size:
                raise AvsmError(
                    f"label map has non-integer values (e.g. {float(frac.flat[0]):g}); "
                    "expected integer labels",
                    p,
                )
            if arr.min() < _INT32.min or arr.max() > _INT32.max:
                raise AvsmError("label map values do not fit in 32-bit integers", p)
            arr = arr.astype(np.int32)
        elif not np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int32)
        if require_labels and not arr.any():
            raise AvsmError("label map contains no non-zero labels", p)
        return Volume(arr, grid, p, is_label=True)

    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise AvsmError("image values overflow 32-bit floats", p)
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        if lo == 0.0:
            raise AvsmError("image is empty (all voxels are zero)", p)
        raise AvsmError(f"image is constant (all voxels equal {lo:g})", p)
    return Volume(arr, grid, p, is_label=False)


# --------------------------------------------------------------------------- saving


def save_image(image: Volume | sitk.Image, path: str | os.PathLike[str], *, compress: bool = True) -> None:
    """Write an image atomically (staged in the target directory, then renamed).

    The format follows the extension.  Label volumes keep their integer dtype,
    intensity volumes their array dtype.

    Args:
        image: a :class:`Volume` or a ``sitk.Image``.
        path: destination; its directory is created if missing.
        compress: ask SimpleITK to compress (``.nrrd``, ``.mha``; ``.nii.gz`` is
            always compressed, ``.nii`` never).

    Raises:
        AvsmError: the file cannot be written (bad directory, unknown format).
    """
    img = image.to_sitk() if isinstance(image, Volume) else image
    p = os.fspath(path)
    with OutputTransaction() as tx:
        tmp = tx.path(p)
        try:
            with _quiet_itk():
                sitk.WriteImage(img, tmp, compress)
        except RuntimeError as e:
            raise AvsmError(f"cannot write image: {_itk_reason(e)}", p) from e


# --------------------------------------------------------------------------- processing


def normalize_intensity(array: np.ndarray, lower: float = 0.1, upper: float = 99.9) -> np.ndarray:
    """Map the ``[lower, upper]`` percentile range to ``[0, 1]`` and clamp.

    Percentiles are taken over all voxels.  If they coincide the min/max range
    is used instead; a constant array gives zeros.

    Args:
        array: intensities of any shape.
        lower: lower percentile (0..100).
        upper: upper percentile (0..100), ``> lower``.

    Returns:
        ``float32`` array of the same shape with values in ``[0, 1]``.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
    a = np.asarray(array, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(a, [lower, upper]))
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a, dtype=np.float32)
    out = (a - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def resample(
    volume: Volume,
    grid: Grid,
    *,
    interpolation: Interpolation | None = None,
    default: float = 0.0,
) -> Volume:
    """Resample a volume onto another grid through world coordinates.

    Uses ``sitk.Resample`` with the identity transform, so both grids must be
    expressed in the same (LPS) world.

    Args:
        volume: source volume.
        grid: target grid.
        interpolation: ``"linear"``, ``"nearest"`` or ``"bspline"``; ``None``
            means nearest for label maps and linear otherwise.  Label maps
            accept only ``"nearest"``.
        default: value for points outside the source image.

    Returns:
        A :class:`Volume` on ``grid`` (``path`` and ``is_label`` kept); label
        maps keep their dtype, intensities become ``float32``.
    """
    if interpolation is None:
        interpolation = "nearest" if volume.is_label else "linear"
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"unknown interpolation {interpolation!r}")
    if volume.is_label and interpolation != "nearest":
        raise ValueError("label maps can only be resampled with interpolation='nearest'")
    src = volume.to_sitk()
    if not volume.is_label and src.GetPixelID() != sitk.sitkFloat32:
        src = sitk.Cast(src, sitk.sitkFloat32)
    f = sitk.ResampleImageFilter()
    f.SetSize(list(grid.itk_size))
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
    f.SetInterpolator(_INTERPOLATORS[interpolation])
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(src.GetPixelID())
    out = sitk.GetArrayFromImage(f.Execute(src))
    if volume.is_label:
        out = out.astype(volume.array.dtype, copy=False)
    return Volume(out, grid, volume.path, volume.is_label)


def check_same_geometry(image: Volume, labels: Volume, tol: float = 1e-3) -> None:
    """Check that a label map lies on its image's grid.

    Args:
        image: intensity volume.
        labels: its label map.
        tol: tolerance on spacing and origin (mm) and direction cosines.

    Raises:
        AvsmError: ``"<labels file>: label map geometry does not match image ..."``.
    """
    a, b = image.grid, labels.grid
    if a.is_close(b, tol):
        return
    if a.shape != b.shape:
        detail = f"shape {b.shape} vs {a.shape}"
    elif not np.allclose(a.spacing, b.spacing, rtol=0, atol=tol):
        detail = f"spacing {tuple(round(s, 4) for s in b.spacing)} vs {tuple(round(s, 4) for s in a.spacing)}"
    elif not np.allclose(a.origin, b.origin, rtol=0, atol=tol):
        detail = f"origin {tuple(round(s, 3) for s in b.origin)} vs {tuple(round(s, 3) for s in a.origin)}"
    else:
        detail = "direction differs"
    raise AvsmError(f"label map geometry does not match image {image.name} ({detail})", labels.name)
