"""Pair construction of ``benchmarks/bench_cohort.py`` (no registration is run)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from avsm.eval.pairs import read_label_mapping, reverse_index

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cohort


def _write(a: np.ndarray, path: Path, spacing: float = 2.0) -> str:
    img = sitk.GetImageFromArray(a)
    img.SetSpacing([spacing] * 3)
    img.SetOrigin([10.0, -5.0, 3.0])
    sitk.WriteImage(img, str(path))
    return str(path)


def test_shared_label_mapping_is_the_intersection_minus_excluded(tmp_path: Path) -> None:
    a = np.zeros((6, 6, 6), np.float32)  # float-stored labels, as OASIS-TRT-20's
    b = np.zeros((6, 6, 6), np.uint8)
    a[0, :, :], a[1, :, :], a[2, :, :], a[3, :, :] = 3, 5, 74, 9
    b[0, :, :], b[1, :, :], b[2, :, :], b[3, :, :] = 3, 5, 74, 11
    fa, fb = _write(a, tmp_path / "a.nii.gz"), _write(b, tmp_path / "b.nii.gz")
    out = tmp_path / "map.csv"
    assert bench_cohort.write_shared_mapping(fa, fb, str(out), exclude=[74]) == [3, 5]
    assert read_label_mapping(str(out)) == {3: 3, 5: 5}


def test_skull_strip_keeps_geometry_and_fills_the_mask(tmp_path: Path) -> None:
    t1 = np.arange(12 ** 3, dtype=np.float32).reshape(12, 12, 12) + 1.0
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:10, 2:10, 2:10] = 7
    lab[5:7, 5:7, 5:7] = 0  # a hole inside the brain (e.g. unlabelled CSF)
    ft, fl = _write(t1, tmp_path / "t1.nii.gz"), _write(lab, tmp_path / "lab.nii.gz")
    out = tmp_path / "strip.nii.gz"
    bench_cohort.skull_strip(ft, fl, str(out))
    img, ref = sitk.ReadImage(str(out)), sitk.ReadImage(ft)
    assert img.GetSize() == ref.GetSize() and img.GetOrigin() == ref.GetOrigin()
    assert img.GetSpacing() == ref.GetSpacing() and img.GetPixelID() == ref.GetPixelID()
    s = sitk.GetArrayFromImage(img)
    inside = np.zeros_like(lab, bool)
    inside[2:10, 2:10, 2:10] = True
    assert np.array_equal(s[inside], t1[inside])  # hole filled: intensities kept there too
    assert not s[~inside].any()


def test_oasis_pairs_both_directions_without_label_74(tmp_path: Path) -> None:
    if not (SHARED / "oasis-trt20").is_dir():
        pytest.skip(f"needs {SHARED / 'oasis-trt20'} (../shared/data)")
    groups = bench_cohort.build_pairs(["oasis"], str(SHARED), str(tmp_path))
    pairs = groups["oasis"]
    assert list(groups) == ["oasis"] and len(pairs) == 10
    assert {p.pair_id for p in pairs} >= {"oasis01<-02", "oasis02<-01", "oasis09<-10", "oasis10<-09"}
    rev = reverse_index(pairs)
    assert sorted(rev) == list(range(10))  # every row has its reverse: consistency at no extra cost
    p = next(q for q in pairs if q.pair_id == "oasis03<-04")
    assert p.fixed.endswith("trt03.nii.gz") and p.moving.endswith("trt04.nii.gz")
    m = read_label_mapping(p.label_mapping)
    assert all(k == v for k, v in m.items())
    assert 74 not in m and 1033 not in m and 2033 not in m  # 74: stray; 1033 only in 04, 2033 only in 03
    assert len(m) == 98 and 17 in m and 53 in m  # 74 is in 03 only (so not shared anyway); hippocampi kept
