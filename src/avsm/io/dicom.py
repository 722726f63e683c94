"""Reading a folder that holds a DICOM series as one 3-D image (SimpleITK / GDCM).

SimpleITK's :class:`sitk.ImageSeriesReader` groups the files of a folder by
SeriesInstanceUID (0020,000E) and stacks them, but it silently accepts a series
with missing slices or uneven slice spacing (it only logs a warning and uses the
mean spacing), so the slice positions are checked here first, from each file's
ImagePositionPatient (0020,0032) projected on the slice normal (the cross
product of the two ImageOrientationPatient (0020,0037) direction cosines).

Geometry of the result (ITK / LPS conventions, see :mod:`avsm.io.geometry`):
ITK axis x runs along the DICOM row direction (first three IOP values), y along
the column direction (last three), z along the slice normal ``row × col``; the
slices are ordered by increasing position along that normal, so the direction
matrix is always right-handed.  The origin is the ImagePositionPatient of the
first slice, the in-plane spacing is PixelSpacing (0028,0030) as read by GDCM
and the slice spacing is the mean distance between neighbouring slices (mm).

Every problem is reported as an :class:`avsm.errors.AvsmError` whose one-line
message names the folder.
"""

from __future__ import annotations

import contextlib
import functools
import locale
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from avsm.errors import AvsmError
from avsm.io.image import _itk_reason, _quiet_itk

T = TypeVar("T")

__all__ = [
    "DicomSeriesInfo",
    "list_dicom_series",
    "read_dicom_series",
    "SLICE_SPACING_RTOL",
    "SLICE_SPACING_ATOL_MM",
]

#: Relative tolerance on the distance between neighbouring slices (fraction of the spacing).
SLICE_SPACING_RTOL: float = 0.01
#: Absolute tolerance (mm) on the distance between neighbouring slices; the larger of the two applies.
SLICE_SPACING_ATOL_MM: float = 0.01
#: Largest allowed difference between the ImageOrientationPatient cosines of two slices.
_ORIENTATION_TOL: float = 1e-4
#: Largest allowed difference (mm) between the in-plane pixel spacings of two slices.
_PIXEL_SPACING_TOL_MM: float = 1e-4
#: How many series an error message lists before it says "and N more".
_MAX_LISTED: int = 10

_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_DESCRIPTION = "0008|103e"
_TAG_SLOPE = "0028|1053"
_TAG_INTERCEPT = "0028|1052"


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID (0020,000E).
        files: its files, in the order GDCM sorts them.
        description: SeriesDescription (0008,103E) of its first file, or ``None``
            when absent or unreadable.
    """

    uid: str
    files: tuple[str, ...]
    description: str | None

    def summary(self) -> str:
        """``"<uid> (<n> slices, '<description>')"`` for messages."""
        n = len(self.files)
        count = f"{n} slice" if n == 1 else f"{n} slices"
        if self.description:
            return f"{self.uid} ({count}, {self.description!r})"
        return f"{self.uid} ({count})"


@dataclass(frozen=True)
class _SliceHeader:
    """What is needed from one file's header (positions in LPS mm)."""

    file: str
    size: tuple[int, ...]  # ITK size of the file's image: (columns, rows[, frames])
    pixel_spacing: tuple[float, float]  # ITK order (x, y), mm
    position: np.ndarray | None  # ImagePositionPatient, (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient, (6,)
    rescale: tuple[str, str]  # (slope, intercept) as written, "" when absent


# --------------------------------------------------------------------------- listing


def _check_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise AvsmError("not a folder", folder)
    if not os.access(folder, os.R_OK | os.X_OK):
        raise AvsmError("folder is not readable (permission denied)", folder)


def _series_ids(folder: str) -> list[str]:
    try:
        with _quiet_itk():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as e:
        raise AvsmError(f"cannot scan folder for DICOM files: {_itk_reason(e)}", folder) from e
    return [str(u).strip().rstrip("\x00") for u in ids]


def _series_files(folder: str, uid: str) -> tuple[str, ...]:
    try:
        with _quiet_itk():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
    except RuntimeError as e:
        raise AvsmError(f"cannot list the files of DICOM series {uid}: {_itk_reason(e)}", folder) from e
    return tuple(str(f) for f in files)


def _header_reader(file: str) -> sitk.ImageFileReader:
    """A GDCM reader that has read ``file``'s header (raises ``RuntimeError`` when it cannot)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(file)
    with _quiet_itk():
        reader.ReadImageInformation()
    return reader


def _meta(reader: sitk.ImageFileReader, key: str) -> str | None:
    """A header value as stored, ``None`` when absent or not decodable (e.g. Latin-1 text)."""
    if not reader.HasMetaDataKey(key):
        return None
    try:
        return reader.GetMetaData(key)
    except UnicodeDecodeError:
        return None


def _read_tag(file: str, tag: str) -> str | None:
    """One header value of a DICOM file (stripped), ``None`` when absent or unreadable."""
    try:
        reader = _header_reader(file)
    except RuntimeError:
        return None
    value = _meta(reader, tag)
    if value is None:
        return None
    value = value.strip().rstrip("\x00").strip()
    return value or None


@contextlib.contextmanager
def _keep_locale() -> Iterator[None]:
    """Restore the process locale afterwards: ITK's DICOM reader (GDCM) may switch it to "C",
    which would make Python's text files ASCII-only for the rest of the process."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        try:
            locale.setlocale(locale.LC_ALL, saved)
        except locale.Error:  # pragma: no cover - the saved locale is always valid
            pass


def _locale_safe(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> T:
        with _keep_locale():
            return fn(*args, **kwargs)

    return inner


@_locale_safe
def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeriesInfo]:
    """All DICOM series directly inside a folder (subfolders are not searched).

    Args:
        folder: a directory.

    Returns:
        One :class:`DicomSeriesInfo` per SeriesInstanceUID, in GDCM's order;
        empty when the folder holds no DICOM file.

    Raises:
        AvsmError: the folder does not exist, is not readable or cannot be scanned.
    """
    d = os.fspath(folder)
    _check_folder(d)
    out = []
    for uid in _series_ids(d):
        files = _series_files(d, uid)
        out.append(DicomSeriesInfo(uid, files, _read_tag(files[0], _TAG_DESCRIPTION) if files else None))
    return out


def _listing(infos: Sequence[DicomSeriesInfo]) -> str:
    shown = "; ".join(i.summary() for i in infos[:_MAX_LISTED])
    if len(infos) > _MAX_LISTED:
        shown += f"; and {len(infos) - _MAX_LISTED} more"
    return shown


def _no_series_error(folder: str) -> AvsmError:
    try:
        has_subfolders = any(e.is_dir() for e in os.scandir(folder))
    except OSError:
        has_subfolders = False
    hint = " (subfolders are not searched)" if has_subfolders else ""
    return AvsmError(
        f"is a directory with no DICOM series{hint}; "
        "expected an image file or a folder holding one DICOM series",
        folder,
    )


def _select(folder: str, series: str | None) -> tuple[str, tuple[str, ...]]:
    """The UID and files of the series to read."""
    ids = _series_ids(folder)
    if not ids:
        raise _no_series_error(folder)
    if series is not None:
        wanted = series.strip()
        if wanted not in ids:
            raise AvsmError(
                f"no DICOM series with SeriesInstanceUID {wanted!r} here; available: "
                f"{_listing(list_dicom_series(folder))}",
                folder,
            )
        return wanted, _series_files(folder, wanted)
    if len(ids) > 1:
        raise AvsmError(
            f"folder holds {len(ids)} DICOM series; choose one by its SeriesInstanceUID: "
            f"{_listing(list_dicom_series(folder))}",
            folder,
        )
    return ids[0], _series_files(folder, ids[0])


# --------------------------------------------------------------------------- headers


def _floats(text: str | None, n: int) -> np.ndarray | None:
    """``n`` finite numbers from a DICOM multi-valued decimal string, else ``None``."""
    if text is None:
        return None
    try:
        vals = np.array([float(v) for v in text.strip().rstrip("\x00").split("\\")], dtype=np.float64)
    except ValueError:
        return None
    if vals.shape != (n,) or not np.isfinite(vals).all():
        return None
    return vals


def _header(folder: str, file: str) -> _SliceHeader:
    try:
        reader = _header_reader(file)
    except RuntimeError as e:
        raise AvsmError(
            f"cannot read the DICOM header of {os.path.basename(file)}: {_itk_reason(e)}", folder
        ) from e

    def tag(key: str) -> str | None:
        return _meta(reader, key)

    spacing = reader.GetSpacing()
    return _SliceHeader(
        file=file,
        size=tuple(int(s) for s in reader.GetSize()),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        position=_floats(tag(_TAG_POSITION), 3),
        orientation=_floats(tag(_TAG_ORIENTATION), 6),
        rescale=((tag(_TAG_SLOPE) or "").strip(), (tag(_TAG_INTERCEPT) or "").strip()),
    )


def _fmt(values: Sequence[float] | np.ndarray, digits: int = 4) -> str:
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"


@dataclass(frozen=True)
class _StackGeometry:
    order: list[int]  # header indices sorted by increasing position along the normal
    origin: np.ndarray  # (3,), mm
    direction: np.ndarray  # (3, 3), columns = ITK axes
    slice_spacing: float  # mm


def _check_stack(folder: str, uid: str, headers: Sequence[_SliceHeader]) -> _StackGeometry:
    """Validate the slices of one series and derive its 3-D geometry."""
    name = os.path.basename
    multi = [h for h in headers if len(h.size) > 2 and h.size[2] > 1]
    if multi:
        raise AvsmError(
            f"DICOM series {uid} holds a multi-frame file ({name(multi[0].file)}, "
            f"{multi[0].size[2]} frames); multi-frame DICOM is not supported, "
            "convert the series to NIfTI or NRRD",
            folder,
        )
    if len(headers) == 1:
        raise AvsmError(
            f"DICOM series {uid} has a single slice ({name(headers[0].file)}), i.e. a 2-D image; "
            "expected a 3-D volume",
            folder,
        )
    for h in headers:
        if h.position is None or h.orientation is None:
            raise AvsmError(
                f"DICOM slice {name(h.file)} of series {uid} has no valid ImagePositionPatient (0020,0032) "
                "or ImageOrientationPatient (0020,0037); cannot determine the volume geometry",
                folder,
            )
    positions = np.stack([np.asarray(h.position, dtype=np.float64) for h in headers])
    orients = np.stack([np.asarray(h.orientation, dtype=np.float64) for h in headers])
    first = headers[0]
    for i, h in enumerate(headers[1:], start=1):
        if h.size[:2] != first.size[:2]:
            raise AvsmError(
                f"DICOM series {uid} mixes slice sizes: {name(first.file)} is "
                f"{first.size[0]}x{first.size[1]}, {name(h.file)} is {h.size[0]}x{h.size[1]}",
                folder,
            )
        if np.abs(orients[i] - orients[0]).max() > _ORIENTATION_TOL:
            raise AvsmError(
                f"DICOM series {uid} mixes slice orientations (ImageOrientationPatient): "
                f"{name(first.file)} {_fmt(orients[0])} vs {name(h.file)} {_fmt(orients[i])}",
                folder,
            )
        if max(abs(a - b) for a, b in zip(h.pixel_spacing, first.pixel_spacing)) > _PIXEL_SPACING_TOL_MM:
            raise AvsmError(
                f"DICOM series {uid} mixes pixel spacings: {name(first.file)} {_fmt(first.pixel_spacing)} mm "
                f"vs {name(h.file)} {_fmt(h.pixel_spacing)} mm",
                folder,
            )

    row, col = orients[0, :3], orients[0, 3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(nr - 1.0) > 0.01 or abs(nc - 1.0) > 0.01 or abs(float(row @ col)) > 1e-3:
        raise AvsmError(
            f"DICOM series {uid} has an invalid ImageOrientationPatient {_fmt(orients[0])} "
            "(row and column directions must be orthogonal unit vectors)",
            folder,
        )
    row = row / nr
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)

    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along = along[order]
    positions = positions[order]
    gaps = np.diff(along)
    step = float(np.median(gaps))
    tol = max(SLICE_SPACING_ATOL_MM, SLICE_SPACING_RTOL * abs(step))
    if gaps.min() <= tol:
        k = int(np.argmin(gaps))
        raise AvsmError(
            f"DICOM series {uid} has {int((gaps <= tol).sum())} repeated slice position(s) along the slice "
            f"normal (e.g. {name(headers[order[k]].file)} and {name(headers[order[k + 1]].file)}); "
            "several echoes, phases or time points in one series are not supported",
            folder,
        )
    dev = np.abs(gaps - step)
    if dev.max() > tol:
        k = int(np.argmax(dev))
        raise AvsmError(
            f"DICOM series {uid} has missing slices or uneven slice spacing: distances between neighbouring "
            f"slices range from {gaps.min():.4g} to {gaps.max():.4g} mm (median {step:.4g} mm, tolerance "
            f"{tol:.3g} mm), e.g. {gaps[k]:.4g} mm between {name(headers[order[k]].file)} and "
            f"{name(headers[order[k + 1]].file)}",
            folder,
        )
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    if drift > tol:
        raise AvsmError(
            f"DICOM series {uid} is sheared: slice positions drift by up to {drift:.4g} mm within the slice "
            "plane (gantry tilt?); such series are not supported",
            folder,
        )
    spacing = float((along[-1] - along[0]) / (len(along) - 1))
    return _StackGeometry(order, positions[0], np.stack([row, col, normal], axis=1), spacing)


# --------------------------------------------------------------------------- reading


@_locale_safe
def read_dicom_series(folder: str | os.PathLike[str], *, series: str | None = None) -> sitk.Image:
    """Read one DICOM series of a folder as a 3-D image, after checking its slices.

    Args:
        folder: directory holding the series' files (subfolders are not searched;
            other files are ignored).
        series: SeriesInstanceUID (0020,000E) of the series to read; required when
            the folder holds several series.

    Returns:
        A 3-D ``sitk.Image`` with the stored pixel type after GDCM's rescale
        (``float32`` when the slices have different RescaleSlope/Intercept),
        slices ordered along the slice normal, geometry as described in the
        module docstring (origin and spacing in mm, LPS).

    Raises:
        AvsmError: one line naming the folder: no DICOM series in it; several
            series and ``series`` not given (the message lists each UID with its
            slice count and SeriesDescription); unknown ``series`` (the message
            lists the available ones); a single slice (2-D) or a multi-frame
            file; slices without position/orientation; slices of different
            sizes, orientations or pixel spacings; repeated positions; missing
            slices or uneven slice spacing (tolerance: the larger of
            :data:`SLICE_SPACING_RTOL` × spacing and
            :data:`SLICE_SPACING_ATOL_MM`); a sheared stack; unreadable files.
    """
    d = os.fspath(folder)
    _check_folder(d)
    uid, files = _select(d, series)
    if not files:
        raise AvsmError(f"DICOM series {uid} lists no files", d)
    headers = [_header(d, f) for f in files]
    geom = _check_stack(d, uid, headers)
    sorted_files = [headers[i].file for i in geom.order]

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sorted_files)
    reader.SetImageIO("GDCMImageIO")
    if len({h.rescale for h in headers}) > 1:
        # each file is rescaled on its own; an integer output type would truncate the others
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with _quiet_itk():
            img = reader.Execute()
    except RuntimeError as e:
        raise AvsmError(f"cannot read DICOM series {uid}: {_itk_reason(e)}", d) from e
    if img.GetDimension() != 3 or img.GetSize()[2] != len(sorted_files):
        raise AvsmError(
            f"DICOM series {uid} read as size {'x'.join(map(str, img.GetSize()))}, "
            f"expected {len(sorted_files)} slices",
            d,
        )
    sx, sy = img.GetSpacing()[:2]
    img.SetSpacing((float(sx), float(sy), geom.slice_spacing))
    img.SetOrigin(tuple(float(v) for v in geom.origin))
    img.SetDirection(tuple(float(v) for v in geom.direction.reshape(-1)))
    return img
