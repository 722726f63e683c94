"""Tests of DICOM series folders as inputs (avsm.io.dicom via load_image), binary masks
(avsm.io.masks.load_mask) and the shared-label helper (avsm.metrics.overlap.shared_labels).

The DICOM series are written here with SimpleITK, one 2-D file per slice with the
per-slice tags set explicitly, from a real volume (tests/data/itk_t1.nii.gz,
subsampled) given an oblique direction and anisotropic spacing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from avsm.errors import AvsmError
from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image, save_image
from avsm.io.masks import load_mask
from avsm.metrics.overlap import dice_per_label, shared_labels

DATA = Path(__file__).parent / "data"

#: geometry tolerance for a DICOM round trip (mm for origin/spacing, unitless for direction
#: cosines); the tags are written with 10 significant digits, so ~1e-9 is reached.
GEOM_TOL = 1e-6


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


#: an oblique, right-handed direction (rotations of 20°, -35° and 50° about x, y and z)
OBLIQUE = _rotation(np.radians(20), np.radians(-35), np.radians(50))
SPACING = (0.9, 1.3, 3.7)
ORIGIN = (-10.5, 20.25, 5.125)


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _ds(values: Sequence[float]) -> str:
    """DICOM decimal-string multi-value (each at most 16 characters)."""
    return "\\".join(f"{float(v):.10g}" for v in values)


def source_image(direction: np.ndarray = OBLIQUE, step: int = 5, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    """A real T1 head volume (int16), subsampled to 32x32 in-plane, with the given geometry."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "itk_t1.nii.gz")))[::step, ::2, ::2]
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction, dtype=np.float64).reshape(-1)))
    return img


def write_series(
    folder: Path,
    img: sitk.Image,
    *,
    uid: str | None = None,
    description: str = "T1 oblique",
    prefix: str = "IM",
    slices: Sequence[int] | None = None,
    shift: Callable[[int], Sequence[float]] | None = None,
    seed: int = 0,
) -> str:
    """Write ``img`` as a DICOM series (one file per slice, shuffled file names).

    Args:
        folder: destination (created).
        img: 3-D image; slice ``k`` is ``img[:, :, k]``.
        uid: SeriesInstanceUID (new one if ``None``).
        description: SeriesDescription.
        prefix: file-name prefix.
        slices: which slices to write (default all; repeats allowed).
        shift: ``k -> (dx, dy, dz)`` mm added to slice ``k``'s ImagePositionPatient.
        seed: for the shuffled file names.

    Returns:
        The SeriesInstanceUID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or _uid()
    study, frame = _uid(), _uid()
    D = np.asarray(img.GetDirection()).reshape(3, 3)
    iop = _ds([*D[:, 0], *D[:, 1]])
    sx, sy, sz = img.GetSpacing()
    ks = list(range(img.GetSize()[2])) if slices is None else list(slices)
    names = np.random.default_rng(seed).permutation(len(ks))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for j, k in enumerate(ks):
        ipp = np.asarray(img.TransformIndexToPhysicalPoint((0, 0, int(k))))
        if shift is not None:
            ipp = ipp + np.asarray(shift(k), dtype=np.float64)
        sl = img[:, :, int(k)]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # SOP class: MR image storage
            "0008|0018": _uid(),  # SOPInstanceUID
            "0008|0060": "MR",  # Modality
            "0008|103e": description,  # SeriesDescription
            "0010|0010": "Test^Phantom",
            "0010|0020": "avsm-test",
            "0018|0050": f"{sz:.10g}",  # SliceThickness
            "0018|0088": f"{sz:.10g}",  # SpacingBetweenSlices
            "0020|000d": study,  # StudyInstanceUID
            "0020|000e": uid,  # SeriesInstanceUID
            "0020|0052": frame,  # FrameOfReferenceUID
            "0020|0013": str(j + 1),  # InstanceNumber
            "0020|0032": _ds(ipp),  # ImagePositionPatient
            "0020|0037": iop,  # ImageOrientationPatient
            "0028|0030": _ds([sy, sx]),  # PixelSpacing: row spacing (y) \ column spacing (x)
            "0028|1052": "0",  # RescaleIntercept
            "0028|1053": "1",  # RescaleSlope
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{names[j]:04d}.dcm"))
        writer.Execute(sl)
    return uid


def assert_error(exc: pytest.ExceptionInfo[AvsmError], path: Path, *words: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def geometry_error(vol: Volume, img: sitk.Image) -> float:
    """Largest difference between a volume's geometry and an image's (mm / cosines)."""
    return float(max(
        np.abs(np.subtract(vol.grid.origin, img.GetOrigin())).max(),
        np.abs(np.subtract(vol.grid.spacing, img.GetSpacing())).max(),
        np.abs(np.subtract(vol.grid.direction, img.GetDirection())).max(),
    ))


# --------------------------------------------------------------------------- DICOM: good series


def test_dicom_series_round_trip_oblique(tmp_path: Path) -> None:
    src = source_image()
    assert src.GetSize() == (32, 32, 13)
    write_series(tmp_path / "dcm", src)
    vol = load_image(tmp_path / "dcm")
    arr = sitk.GetArrayFromImage(src)
    assert vol.array.dtype == np.float32 and not vol.is_label
    assert vol.grid.shape == (13, 32, 32)
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    np.testing.assert_allclose(vol.grid.origin, ORIGIN, rtol=0, atol=GEOM_TOL)
    np.testing.assert_allclose(vol.grid.spacing, SPACING, rtol=0, atol=GEOM_TOL)
    np.testing.assert_allclose(vol.grid.direction, OBLIQUE.reshape(-1), rtol=0, atol=GEOM_TOL)
    assert geometry_error(vol, src) < GEOM_TOL
    assert vol.path == str(tmp_path / "dcm")

    labels = load_image(tmp_path / "dcm", label=True)
    assert labels.is_label and np.issubdtype(labels.array.dtype, np.integer)
    np.testing.assert_array_equal(labels.array, arr)
    assert labels.grid == vol.grid


def test_dicom_left_handed_source_is_read_along_the_normal(tmp_path: Path) -> None:
    """DICOM's slice axis is row x col: a left-handed source comes back with its slices reversed."""
    direction = OBLIQUE @ np.diag([1.0, 1.0, -1.0])
    src = source_image(direction)
    write_series(tmp_path / "dcm", src)
    vol = load_image(tmp_path / "dcm")
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(src)[::-1].astype(np.float32))
    last = src.TransformIndexToPhysicalPoint((0, 0, src.GetSize()[2] - 1))
    np.testing.assert_allclose(vol.grid.origin, last, rtol=0, atol=GEOM_TOL)
    np.testing.assert_allclose(vol.grid.direction, OBLIQUE.reshape(-1), rtol=0, atol=GEOM_TOL)
    np.testing.assert_allclose(vol.grid.spacing, SPACING, rtol=0, atol=GEOM_TOL)
    assert np.linalg.det(vol.grid.direction_matrix) > 0


def test_dicom_spacing_jitter_within_tolerance_accepted(tmp_path: Path) -> None:
    src = source_image()
    write_series(tmp_path / "dcm", src, shift=lambda k: OBLIQUE[:, 2] * (0.005 if k == 6 else 0.0))
    vol = load_image(tmp_path / "dcm")  # 0.005 mm < max(0.01 mm, 1 % of 3.7 mm)
    np.testing.assert_allclose(vol.grid.spacing, SPACING, rtol=0, atol=1e-3)


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    a = source_image()
    b = source_image(_rotation(0.1, 0.2, -0.3), step=9, spacing=(1.1, 1.0, 8.0), origin=(3.0, -4.0, 60.0))
    assert b.GetSize()[2] == 7
    folder = tmp_path / "dcm"
    uid_a = write_series(folder, a, description="T1 oblique", prefix="A")
    uid_b = write_series(folder, b, description="second series", prefix="B", seed=1)
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "holds 2 DICOM series", "SeriesInstanceUID",
                 f"{uid_a} (13 slices, 'T1 oblique')", f"{uid_b} (7 slices, 'second series')")
    for uid, img in ((uid_a, a), (uid_b, b)):
        vol = load_image(folder, series=uid)
        np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img).astype(np.float32))
        assert geometry_error(vol, img) < GEOM_TOL
    with pytest.raises(AvsmError) as e:
        load_image(folder, series="2.25.999")
    assert_error(e, folder, "2.25.999", "available", uid_a, uid_b)


# --------------------------------------------------------------------------- DICOM: bad series


def test_missing_middle_slice_rejected(tmp_path: Path) -> None:
    src = source_image()
    folder = tmp_path / "gap"
    write_series(folder, src, slices=[k for k in range(13) if k != 6])
    # SimpleITK alone reads it (with the mean spacing); the check is ours
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        assert sitk.ReadImage(files).GetSize() == (32, 32, 12)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "missing slices or uneven slice spacing", "3.7 to 7.4 mm")


def test_uneven_spacing_rejected(tmp_path: Path) -> None:
    src = source_image()
    folder = tmp_path / "uneven"
    write_series(folder, src, shift=lambda k: OBLIQUE[:, 2] * (0.5 if k == 4 else 0.0))
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "uneven slice spacing", "4.2")


def test_repeated_slice_position_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    write_series(folder, source_image(), slices=[*range(13), 5])
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "repeated slice position")


def test_sheared_series_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "tilt"
    write_series(folder, source_image(), shift=lambda k: OBLIQUE[:, 0] * 0.2 * k)
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "sheared")


def test_single_slice_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    write_series(folder, source_image(), slices=[3])
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "single slice", "2-D")


def test_empty_folder_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    msg = assert_error(e, folder, "directory", "no DICOM series")
    assert "subfolders" not in msg


def test_folder_of_non_dicom_files_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(600))
    save_image(Volume.from_sitk(source_image()), folder / "t1.nii.gz")
    write_series(folder / "sub", source_image())  # a series one level down is not searched
    with pytest.raises(AvsmError) as e:
        load_image(folder)
    assert_error(e, folder, "no DICOM series", "subfolders are not searched")
    assert load_image(folder / "sub").grid.shape == (13, 32, 32)


def test_series_keyword_refused_for_a_file(tmp_path: Path) -> None:
    p = tmp_path / "t1.nii.gz"
    save_image(Volume.from_sitk(source_image()), p)
    assert load_image(p).grid.shape == (13, 32, 32)
    with pytest.raises(AvsmError) as e:
        load_image(p, series="2.25.1")
    assert_error(e, p, "DICOM folder")


# --------------------------------------------------------------------------- masks


@pytest.fixture(scope="module")
def reference() -> Volume:
    return load_image(DATA / "colin_4mm.nii.gz")


@pytest.fixture(scope="module")
def structures() -> np.ndarray:
    return load_image(DATA / "colin_4mm_labels.nii.gz", label=True).array


def _write_mask(path: Path, arr: np.ndarray, grid: Grid) -> Path:
    sitk.WriteImage(Volume(arr, grid).to_sitk(), str(path))
    return path


def test_good_mask_loads(tmp_path: Path, reference: Volume, structures: np.ndarray) -> None:
    want = (structures == 1).astype(np.uint8)
    assert 0 < want.sum() < want.size
    for name, arr in (("thal.nii.gz", want), ("thal_float.nrrd", want.astype(np.float32)),
                      ("thal_int16.mha", want.astype(np.int16))):
        m = load_mask(_write_mask(tmp_path / name, arr, reference.grid), reference)
        assert m.array.dtype == np.uint8 and m.is_label
        np.testing.assert_array_equal(m.array, want)
        assert m.grid == reference.grid and m.path == str(tmp_path / name)


def test_mask_within_geometry_tolerance_snaps_to_reference(tmp_path: Path, reference: Volume,
                                                          structures: np.ndarray) -> None:
    g = reference.grid
    near = Grid(g.shape, g.spacing, tuple(o + 5e-4 for o in g.origin), g.direction)  # type: ignore[arg-type]
    m = load_mask(_write_mask(tmp_path / "near.nii.gz", (structures == 2).astype(np.uint8), near), reference)
    assert m.grid == reference.grid


def test_mask_on_another_grid_rejected(tmp_path: Path, reference: Volume, structures: np.ndarray) -> None:
    g = reference.grid
    arr = (structures == 1).astype(np.uint8)
    shifted = Grid(g.shape, g.spacing, (g.origin[0] + 0.01, *g.origin[1:]), g.direction)
    p = _write_mask(tmp_path / "shifted.nii.gz", arr, shifted)
    with pytest.raises(AvsmError) as e:
        load_mask(p, reference)
    assert_error(e, p, "mask geometry does not match image", "origin", reference.name)
    q = _write_mask(tmp_path / "cropped.nii.gz", arr[1:], g.resized((g.shape[0] - 1, *g.shape[1:])))
    with pytest.raises(AvsmError) as e:
        load_mask(q, reference)
    assert_error(e, q, "mask geometry", "shape")


def test_empty_mask_rejected(tmp_path: Path, reference: Volume) -> None:
    p = _write_mask(tmp_path / "empty.nii.gz", np.zeros(reference.grid.shape, np.uint8), reference.grid)
    with pytest.raises(AvsmError) as e:
        load_mask(p, reference)
    assert_error(e, p, "empty", "no voxel equals 1")


def test_non_binary_mask_rejected(tmp_path: Path, reference: Volume, structures: np.ndarray) -> None:
    p = _write_mask(tmp_path / "labels.nii.gz", structures, reference.grid)
    with pytest.raises(AvsmError) as e:
        load_mask(p, reference)
    assert_error(e, p, "values other than 0 and 1", "found 0, 1, 2, 3, 4, 5, 6, 7, ... (13 distinct values)")
    soft = (structures == 1).astype(np.float32)
    soft[structures == 2] = 0.5
    q = _write_mask(tmp_path / "soft.nrrd", soft, reference.grid)
    with pytest.raises(AvsmError) as e:
        load_mask(q, reference)
    assert_error(e, q, "found 0, 0.5, 1)")
    twos = (structures == 3).astype(np.int16) * 2  # no 1 at all: the values error, not "empty"
    r = _write_mask(tmp_path / "twos.mha", twos, reference.grid)
    with pytest.raises(AvsmError) as e:
        load_mask(r, reference)
    assert_error(e, r, "found 0, 2)")


def test_unreadable_mask_rejected(tmp_path: Path, reference: Volume) -> None:
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not a mask" * 50)
    with pytest.raises(AvsmError) as e:
        load_mask(bad, reference)
    assert_error(e, bad)
    missing = tmp_path / "nothere.nii.gz"
    with pytest.raises(AvsmError) as e:
        load_mask(missing, reference)
    assert_error(e, missing, "not found")
    with pytest.raises(AvsmError) as e:
        load_mask(tmp_path, reference)
    assert_error(e, tmp_path, "directory")
    nan = np.zeros(reference.grid.shape, np.float32)
    nan[1, 1, 1], nan[2, 2, 2] = 1.0, np.nan
    n = _write_mask(tmp_path / "nan.nii.gz", nan, reference.grid)
    with pytest.raises(AvsmError) as e:
        load_mask(n, reference)
    assert_error(e, n, "NaN")


# --------------------------------------------------------------------------- shared labels


def test_shared_labels() -> None:
    fixed = np.zeros((4, 5, 6), np.int32)
    fixed[0, :2] = 1
    fixed[1, :2] = 2
    fixed[2, :2] = 9
    moving = np.zeros((3, 3, 3), np.uint8)  # other grid: only the values matter
    moving[0, 0, 0], moving[1, 1, 1], moving[2, 2, 2] = 5, 7, 9
    assert shared_labels(fixed, moving, None) == [9]
    assert shared_labels(fixed, moving, {1: 5, 2: 6}) == [1, 9]  # 9 unmapped -> itself
    assert shared_labels(fixed, moving, {1: 5, 2: 7, 9: 0}) == [1, 2]  # mapped to background: never shared
    assert shared_labels(fixed, moving, {}) == [9]
    disjoint = np.where(moving > 0, moving + 100, 0)
    assert shared_labels(fixed, disjoint, None) == []
    assert shared_labels(fixed, disjoint, {1: 2}) == []
    assert shared_labels(np.zeros((2, 2, 2), np.int16), np.zeros((2, 2, 2), np.int16), None) == []


def test_shared_labels_empty_means_dice_is_meaningless() -> None:
    truth = np.zeros((6, 6, 6), np.int32)
    pred = np.zeros_like(truth)
    truth[:3] = 1
    pred[3:] = 2
    assert shared_labels(truth, pred, None) == []
    assert all(v == 0.0 for v in dice_per_label(pred, truth, labels=[1]).values())
    assert shared_labels(truth, pred, {1: 2}) == [1]
    assert dice_per_label(pred, truth, labels=[1], mapping={1: 2})[1] == 0.0
