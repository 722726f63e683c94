"""Tests of avsm.io: loading/validation, atomic saving, resampling, output transactions,
and the bundled demo data and test fixtures."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from avsm.data import demo_paths
from avsm.errors import AvsmError
from avsm.io.geometry import Grid
from avsm.io.image import (
    Volume,
    check_same_geometry,
    load_image,
    normalize_intensity,
    resample,
    save_image,
)
from avsm.io.outputs import STAGING_PREFIX, OutputTransaction, atomic_write_text

DATA = Path(__file__).parent / "data"

OBLIQUE = (0.8660254, -0.5, 0.0, 0.4330127, 0.75, -0.5, 0.25, 0.4330127, 0.8660254)


def make_image(array: np.ndarray, spacing=(0.9, 1.1, 2.5), origin=(-10.0, 20.0, 5.5),
               direction=OBLIQUE) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def rand_array(shape=(6, 7, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32) * 100


def write(img: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(img, str(path))
    return path


def assert_error(exc: pytest.ExceptionInfo[AvsmError], path: Path, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert path.name in msg
    for w in words:
        assert w.lower() in msg.lower(), msg


def no_staging_left(folder: Path) -> bool:
    return not any(p.name.startswith(STAGING_PREFIX) for p in folder.iterdir())


# ----------------------------------------------------------------------------- errors


def test_avsm_error_is_one_line() -> None:
    e = AvsmError("bad\nthing  here", "dir/moving.nii.gz")
    assert str(e) == "dir/moving.nii.gz: bad thing here"
    assert e.path == "dir/moving.nii.gz" and e.problem == "bad thing here"
    assert str(AvsmError("no file")) == "no file"
    assert isinstance(e, Exception)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_round_trip_intensity_keeps_geometry(tmp_path: Path, ext: str) -> None:
    arr = rand_array()
    src = make_image(arr)
    vol = Volume.from_sitk(src)
    out = tmp_path / f"img{ext}"
    save_image(vol, out)
    back = load_image(out)
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, arr)
    assert back.grid.shape == (6, 7, 8)
    np.testing.assert_allclose(back.grid.spacing, src.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.grid.origin, src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.grid.direction, src.GetDirection(), atol=1e-5)
    assert back.path == str(out) and not back.is_label
    assert no_staging_left(tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_round_trip_labels_keep_dtype(tmp_path: Path, dtype, ext: str) -> None:
    arr = np.random.default_rng(1).integers(0, 5, size=(5, 6, 7)).astype(dtype)
    vol = Volume(arr, Grid.from_sitk(make_image(arr)), is_label=True)
    out = tmp_path / f"lab{ext}"
    save_image(vol, out)
    back = load_image(out, label=True)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, arr)
    assert back.is_label
    assert back.grid.is_close(vol.grid, 1e-4)


def test_save_image_accepts_sitk_and_creates_dir(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "x.nii.gz"
    save_image(make_image(rand_array()), out)
    assert out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.nii.gz"]


def test_save_image_bad_extension(tmp_path: Path) -> None:
    out = tmp_path / "x.notaformat"
    with pytest.raises(AvsmError) as e:
        save_image(make_image(rand_array()), out)
    assert_error(e, out, "cannot write")
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "moving.nii.gz"
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "not found")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(AvsmError) as e:
        load_image(tmp_path)
    assert_error(e, tmp_path, "directory")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    good = write(make_image(rand_array((20, 20, 20))), tmp_path / f"good{ext}")
    data = good.read_bytes()
    bad = tmp_path / f"truncated{ext}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(AvsmError) as e:
        load_image(bad)
    assert_error(e, bad, "truncated" if ext.startswith(".nii") else "cannot read")


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not an image" * 10)
    with pytest.raises(AvsmError) as e:
        load_image(bad)
    assert_error(e, bad)
    bad2 = tmp_path / "garbage.mha"
    bad2.write_bytes(b"\x00\x01junk" * 10)
    with pytest.raises(AvsmError) as e:
        load_image(bad2)
    assert_error(e, bad2, "cannot read")


def test_2d_image_rejected(tmp_path: Path) -> None:
    p = write(sitk.GetImageFromArray(rand_array((6, 7))), tmp_path / "flat.nii.gz")
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "2-D")


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_4d_singleton_accepted(tmp_path: Path, ext: str) -> None:
    arr = rand_array((1, 6, 7, 8))
    p = write(sitk.GetImageFromArray(arr, isVector=False), tmp_path / f"four{ext}")
    vol = load_image(p)
    assert vol.array.shape == (6, 7, 8)
    np.testing.assert_allclose(vol.array, arr[0])


def test_4d_series_rejected(tmp_path: Path) -> None:
    p = write(sitk.GetImageFromArray(rand_array((3, 6, 7, 8)), isVector=False), tmp_path / "series.nii.gz")
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "4-D", "3 volumes")


def test_vector_image_rejected(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(rand_array((5, 6, 7, 3)), isVector=True)
    p = write(img, tmp_path / "vector.nii.gz")
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "vector")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_inf_rejected(tmp_path: Path, bad: float, ext: str, dtype) -> None:
    # (ITK's NIfTI reader silently turns NaN/Inf into 0, so NIfTI is checked on the raw bytes)
    arr = rand_array().astype(dtype)
    arr[2, 3, 4] = bad
    p = write(make_image(arr), tmp_path / f"moving{ext}")
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "NaN or Inf")
    with pytest.raises(AvsmError):
        load_image(p, label=True)


def test_empty_and_constant_rejected(tmp_path: Path) -> None:
    p = write(make_image(np.zeros((5, 6, 7), np.float32)), tmp_path / "empty.nii.gz")
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "empty")
    q = write(make_image(np.full((5, 6, 7), 3.5, np.float32)), tmp_path / "constant.nrrd")
    with pytest.raises(AvsmError) as e:
        load_image(q)
    assert_error(e, q, "constant")
    # an empty label map is fine unless labels are required
    r = write(make_image(np.zeros((5, 6, 7), np.uint8)), tmp_path / "nolabels.nii.gz")
    assert load_image(r, label=True).array.dtype == np.uint8
    with pytest.raises(AvsmError) as e:
        load_image(r, label=True, require_labels=True)
    assert_error(e, r, "no non-zero labels")


@pytest.mark.parametrize("shape", [(1, 6, 7), (6, 1, 7), (6, 7, 1)])
def test_too_thin(tmp_path: Path, shape) -> None:
    p = write(make_image(rand_array(shape)), tmp_path / "thin.nii.gz")
    with pytest.raises(AvsmError) as e:
        load_image(p)
    assert_error(e, p, "too thin")


def test_float_labels(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).integers(0, 4, size=(5, 6, 7)).astype(np.float32)
    p = write(make_image(arr), tmp_path / "labels.nii.gz")
    vol = load_image(p, label=True)
    assert vol.array.dtype == np.int32
    np.testing.assert_array_equal(vol.array, arr.astype(np.int32))
    arr[1, 1, 1] = 0.5
    q = write(make_image(arr), tmp_path / "soft_labels.nii.gz")
    with pytest.raises(AvsmError) as e:
        load_image(q, label=True)
    assert_error(e, q, "non-integer")


def test_intensity_int_becomes_float32(tmp_path: Path) -> None:
    arr = np.random.default_rng(3).integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    p = write(make_image(arr), tmp_path / "t1.nrrd")
    vol = load_image(p)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))


# ----------------------------------------------------------------------------- processing


def test_normalize_intensity() -> None:
    a = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    out = normalize_intensity(a)
    assert out.dtype == np.float32 and out.shape == a.shape
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(a, [0.1, 99.9])
    np.testing.assert_allclose(out[5, 0, 0], (500 - lo) / (hi - lo), rtol=1e-6)
    assert np.all(normalize_intensity(np.full((3, 3, 3), 7.0)) == 0)
    b = np.zeros((10, 10, 10))
    b[0, 0, 0] = 5.0  # percentiles coincide: falls back to min/max
    assert normalize_intensity(b).max() == 1.0
    with pytest.raises(ValueError):
        normalize_intensity(a, 50, 10)


def test_resample_identity_and_labels() -> None:
    arr = rand_array((6, 7, 8))
    vol = Volume.from_sitk(make_image(arr))
    same = resample(vol, vol.grid)
    np.testing.assert_allclose(same.array, arr, atol=1e-4)
    assert same.array.dtype == np.float32
    labels = Volume((arr > 50).astype(np.uint8) * 3, vol.grid, is_label=True)
    finer = resample(labels, vol.grid.resized((11, 13, 15)))
    assert finer.array.dtype == np.uint8 and finer.is_label
    assert set(np.unique(finer.array)) <= {0, 3}
    with pytest.raises(ValueError):
        resample(labels, vol.grid, interpolation="linear")
    smooth = resample(vol, vol.grid.resized((11, 13, 15)), interpolation="bspline")
    assert smooth.array.shape == (11, 13, 15)


def test_resample_to_canonical_is_permutation() -> None:
    arr = rand_array((6, 7, 8))
    img = make_image(arr, direction=(0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    vol = Volume.from_sitk(img)
    can = vol.canonical()
    res = resample(vol, can.grid, interpolation="nearest")
    np.testing.assert_array_equal(res.array, can.array)
    np.testing.assert_allclose(resample(vol, can.grid).array, can.array, atol=1e-3)


def test_check_same_geometry(tmp_path: Path) -> None:
    arr = rand_array()
    img = Volume.from_sitk(make_image(arr), path="dir/moving.nii.gz")
    lab = Volume((arr > 50).astype(np.uint8), img.grid, path="dir/moving_labels.nii.gz", is_label=True)
    check_same_geometry(img, lab)
    shifted = Grid(img.grid.shape, img.grid.spacing, (0.0, 0.0, 0.0), img.grid.direction)
    bad = Volume(lab.array, shifted, path="dir/moving_labels.nii.gz", is_label=True)
    with pytest.raises(AvsmError) as e:
        check_same_geometry(img, bad)
    msg = str(e.value)
    assert msg.startswith("dir/moving_labels.nii.gz: label map geometry does not match image")
    assert "\n" not in msg
    other = Volume(np.zeros((6, 7, 9), np.uint8), img.grid.resized((6, 7, 9)), path="l.nii", is_label=True)
    with pytest.raises(AvsmError, match="shape"):
        check_same_geometry(img, other)


def test_volume_shape_must_match_grid() -> None:
    g = Grid.from_sitk(make_image(rand_array()))
    with pytest.raises(ValueError):
        Volume(np.zeros((8, 7, 6), np.float32), g)


# ----------------------------------------------------------------------------- outputs


def test_transaction_commits_all(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputTransaction() as tx:
        a = tx.path(out / "a.nii.gz")
        b = tx.path(out / "b.txt")
        assert a.endswith("a.nii.gz") and b.endswith(".txt")
        assert os.path.dirname(os.path.dirname(a)) == str(out)
        assert tx.path(out / "a.nii.gz") == a
        save_image(make_image(rand_array()), a)
        Path(b).write_text("hello")
        assert not (out / "a.nii.gz").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.txt"]
    assert (out / "b.txt").read_text() == "hello"


def test_transaction_exception_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with OutputTransaction() as tx:
            Path(tx.path(tmp_path / "keep.txt")).write_text("new")
            save_image(make_image(rand_array()), tx.path(tmp_path / "sub" / "w.nii.gz"))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]
    assert list((tmp_path / "sub").iterdir()) == []
    assert (tmp_path / "keep.txt").read_text() == "old"


def test_transaction_unwritten_output_is_error(tmp_path: Path) -> None:
    with pytest.raises(AvsmError) as e:
        with OutputTransaction() as tx:
            Path(tx.path(tmp_path / "a.txt")).write_text("a")
            tx.path(tmp_path / "never.txt")
    assert_error(e, tmp_path / "never.txt", "not written")
    assert list(tmp_path.iterdir()) == []


def test_transaction_detached_header(tmp_path: Path) -> None:
    with OutputTransaction() as tx:
        save_image(make_image(rand_array()), tx.path(tmp_path / "img.mhd"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "img.mhd" and names[1] in ("img.raw", "img.zraw") and len(names) == 2
    assert load_image(tmp_path / "img.mhd").array.shape == (6, 7, 8)


def test_transaction_refuses_to_overwrite_input(tmp_path: Path) -> None:
    inp = write(make_image(rand_array()), tmp_path / "moving.nii.gz")
    with OutputTransaction(inputs=[inp]) as tx:
        with pytest.raises(AvsmError) as e:
            tx.path(tmp_path / "sub" / ".." / "moving.nii.gz")
        assert_error(e, inp, "overwrite an input")
    link = tmp_path / "hardlink.nii.gz"
    os.link(inp, link)
    with OutputTransaction(inputs=[str(inp)]) as tx:
        with pytest.raises(AvsmError, match="overwrite"):
            tx.path(link)
    rel = os.path.relpath(inp)
    with OutputTransaction(inputs=[rel]) as tx, pytest.raises(AvsmError):
        tx.path(inp)


def test_transaction_bad_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    target = blocker / "out" / "w.nii.gz"
    with pytest.raises(AvsmError) as e:
        with OutputTransaction() as tx:
            tx.path(target)
    msg = str(e.value)
    assert "\n" not in msg and "afile" in msg and "output directory" in msg
    with pytest.raises(AvsmError, match="directory"):
        with OutputTransaction() as tx:
            tx.path(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_transaction_unwritable_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(AvsmError) as e:
            with OutputTransaction() as tx:
                tx.path(ro / "w.nii.gz")
        assert_error(e, ro, "not writable")
    finally:
        ro.chmod(0o700)


def test_atomic_write_text(tmp_path: Path) -> None:
    p = tmp_path / "d" / "report.json"
    atomic_write_text(p, '{"a": 1}\n')
    assert p.read_text() == '{"a": 1}\n'
    atomic_write_text(p, "second")
    assert p.read_text() == "second"
    assert no_staging_left(p.parent)


# ----------------------------------------------------------------------------- bundled data


def test_demo_data() -> None:
    paths = demo_paths()
    assert set(paths) >= {"moving", "moving_labels", "fixed", "fixed_labels", "labels_csv"}
    with open(paths["labels_csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["value"]) for r in rows] == list(range(1, 13))
    assert rows[0]["name"].startswith("thalamus")
    total = 0
    for key in ("moving", "fixed"):
        img = load_image(paths[key])
        lab = load_image(paths[key + "_labels"], label=True, require_labels=True)
        check_same_geometry(img, lab)
        assert lab.array.dtype == np.uint8
        assert sorted(np.unique(lab.array)) == list(range(13))
        np.testing.assert_allclose(img.grid.spacing, (2.5, 2.5, 2.5))
        total += paths[key].stat().st_size + paths[key + "_labels"].stat().st_size
    assert total < 1_000_000


@pytest.mark.parametrize("name", ["colin_4mm", "mni_4mm"])
def test_fixture_brains(name: str) -> None:
    img = load_image(DATA / f"{name}.nii.gz")
    lab = load_image(DATA / f"{name}_labels.nii.gz", label=True, require_labels=True)
    check_same_geometry(img, lab)
    assert all(40 <= n <= 64 for n in img.grid.shape)
    assert sorted(np.unique(lab.array)) == list(range(13))
    # RAS-stored NIfTI: ITK direction diag(-1, -1, 1); canonical flips x and y
    np.testing.assert_allclose(img.grid.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    can = img.canonical()
    np.testing.assert_allclose(can.grid.direction_matrix, np.eye(3))
    np.testing.assert_array_equal(can.array, img.array[:, ::-1, ::-1])


def test_fixture_oblique_itk_t1() -> None:
    vol = load_image(DATA / "itk_t1.nii.gz")
    assert vol.grid.shape == (62, 64, 64)
    np.testing.assert_allclose(vol.grid.spacing, (4.0317, 4.0317, 3.0), atol=1e-3)
    assert not np.allclose(vol.grid.direction_matrix, np.eye(3))
    ref = sitk.DICOMOrient(vol.to_sitk(), "LPS")
    can = vol.canonical()
    assert can.grid.is_close(Grid.from_sitk(ref), 1e-6)
    np.testing.assert_array_equal(can.array, sitk.GetArrayFromImage(ref))
    # the coronal slice axis becomes tensor axis 1 (A-P)
    assert can.grid.shape == (64, 62, 64)


def test_fixture_radiomics_nrrd() -> None:
    vol = load_image(DATA / "radiomics_brain1.nrrd")
    assert vol.grid.shape == (25, 67, 67)
    np.testing.assert_allclose(vol.grid.spacing, (3.018, 3.018, 6.5), atol=1e-2)
    w = vol.grid.canonical().working_grid(2.0)
    assert all(n % 16 == 0 for n in w.shape)


def test_fixture_sizes() -> None:
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert total < 1_500_000
