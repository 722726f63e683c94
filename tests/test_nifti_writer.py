"""The streamed NIfTI writer: standard gzip that every reader opens, with each deflate path.

Paths: stored blocks (``level=0``), zlib run-length pieces made on several threads and
joined into one deflate stream (``level=1`` without ``isal``), and ISA-L (``level=1`` with
the optional ``isal`` package; skipped without it).  Readers: Python's ``gzip``, ``zlib``
(one member, ``wbits=31``), nibabel and SimpleITK (ITK's NIfTI IO, what ANTs uses).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import avsm.io.nifti as nifti
from avsm.io.geometry import Grid
from avsm.io.nifti import write_nifti


def _grid() -> Grid:
    c, s = np.cos(0.3), np.sin(0.3)
    return Grid((13, 17, 11), (1.2, 0.9, 2.0), (4.0, -7.0, 12.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


def _field(grid: Grid) -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.standard_normal((3, *grid.shape)), axis=3).astype(np.float32)  # compressible-ish
    smooth[:, :4] = 0.0  # a constant region
    return np.ascontiguousarray(smooth)


def _check_readers(path: Path, array: np.ndarray, grid: Grid, vector: bool) -> None:
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    body = gzip.decompress(raw)
    assert body == zlib.decompress(raw, 31)  # one gzip member, no trailing data
    assert body[352:] == array.tobytes()
    img = sitk.ReadImage(str(path))
    got = sitk.GetArrayFromImage(img)
    if vector:
        assert img.GetNumberOfComponentsPerPixel() == 3
        assert np.array_equal(np.moveaxis(got, -1, 0), array)
    else:
        assert np.array_equal(got, array)
    assert np.allclose(img.GetSpacing(), grid.spacing) and np.allclose(img.GetOrigin(), grid.origin)
    assert np.allclose(img.GetDirection(), grid.direction, atol=1e-6)
    nii = nib.load(str(path))
    data = np.asanyarray(nii.dataobj)
    expect = np.moveaxis(array, 0, -1).transpose(2, 1, 0, 3)[:, :, :, None, :] if vector else array.transpose(2, 1, 0)
    assert np.array_equal(data, expect)


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("threads", [1, 3])
def test_zlib_paths_write_standard_gzip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: int,
                                        threads: int) -> None:
    monkeypatch.setattr(nifti, "_ISAL", None)
    monkeypatch.setattr(nifti, "_CHUNK", 4096)  # many pieces: the joins are exercised
    monkeypatch.setattr(nifti, "_threads", lambda: threads)
    grid = _grid()
    field = _field(grid)
    image = np.ascontiguousarray(field[0] * 10).astype(np.int16)
    for name, arr, vector in (("f.nii.gz", field, True), ("i.nii.gz", image, False)):
        p = tmp_path / name
        write_nifti(arr, grid, p, vector=vector, level=level)
        _check_readers(p, arr, grid, vector)
        if level == 1:
            assert p.stat().st_size < 0.95 * (arr.nbytes + 352)  # it does compress
    plain = tmp_path / "f.nii"
    write_nifti(field, grid, plain, vector=True)
    assert plain.read_bytes()[352:] == field.tobytes()


@pytest.mark.skipif(nifti._load_isal() is None, reason="the optional isal package is not installed")
def test_isal_path_writes_standard_gzip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nifti, "_ISAL", nifti._load_isal())
    monkeypatch.setattr(nifti, "_CHUNK", 4096)
    assert nifti.deflate_backend() == "isal"
    grid = _grid()
    field = _field(grid)
    p = tmp_path / "f.nii.gz"
    write_nifti(field, grid, p, vector=True)
    _check_readers(p, field, grid, True)
    assert p.stat().st_size < 0.95 * (field.nbytes + 352)


def test_bad_level_and_layout(tmp_path: Path) -> None:
    grid = _grid()
    with pytest.raises(ValueError, match="level"):
        write_nifti(np.zeros(grid.shape, np.float32), grid, tmp_path / "x.nii.gz", level=6)
    with pytest.raises(ValueError, match="C-contiguous"):
        write_nifti(np.zeros(grid.shape, np.float32).T, grid, tmp_path / "x.nii.gz")
