"""The IXI cohort listing, its held-out split and the training-source guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from avsm.errors import AvsmError
from avsm.train.cohort import (
    Subject,
    check_training_sources,
    is_held_out,
    ixi_subjects,
    split_subjects,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _fake_cohort(folder: Path, n: int) -> list[str]:
    ids = [f"IXI{i:03d}-HH-{1000 + i:04d}" for i in range(n)]
    for k, sid in enumerate(ids):
        (folder / f"{sid}_T1.nii.gz").write_bytes(b"")
        if k % 2 == 0:
            (folder / f"{sid}_T1_DLMUSE.nii.gz").write_bytes(b"")
    (folder / "README.txt").write_text("not a subject")
    return ids


def test_listing_pairs_images_with_labels(tmp_path: Path) -> None:
    ids = _fake_cohort(tmp_path, 6)
    subs = ixi_subjects(tmp_path)
    assert [s.id for s in subs] == ids
    assert [s.labels is not None for s in subs] == [True, False] * 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AvsmError, match="no IXI"):
        ixi_subjects(empty)
    with pytest.raises(AvsmError, match="not found"):
        ixi_subjects(tmp_path / "missing")


def test_split_is_a_function_of_the_id_alone() -> None:
    subs = [Subject(f"IXI{i:03d}-HH-{1000 + i:04d}", f"{i}.nii.gz", None) for i in range(400)]
    train, held = split_subjects(subs, 0.15)
    assert not {s.id for s in train} & {s.id for s in held}
    assert len(train) + len(held) == 400
    assert 0.10 < len(held) / 400 < 0.20  # SHA-1 spreads the IDs evenly
    # order and cohort size do not move a subject between the parts
    train2, held2 = split_subjects(list(reversed(subs[:250])), 0.15)
    assert {s.id for s in held2} == {s.id for s in held if int(s.image.split(".")[0]) < 250}
    assert all(is_held_out(s.id) for s in held) and not any(is_held_out(s.id) for s in train)
    assert split_subjects(subs, 0.0)[1] == [] and split_subjects(subs, 1.0)[0] == []


def test_real_ixi_split() -> None:
    folder = SHARED / "ixi185"
    if not folder.is_dir():
        pytest.skip(f"needs {folder} (../shared/data)")
    subs = ixi_subjects(folder)
    assert len(subs) == 185 and all(s.labels for s in subs)
    train, held = split_subjects(subs)
    assert 15 <= len(held) <= 40 and len(train) + len(held) == 185


@pytest.mark.parametrize("path", ["../shared/data/oasis-trt20/trt01.nii.gz", "/x/colin27_t1.nii.gz",
                                  "data/MNI2009c_brain.nii.gz"])
def test_validation_and_evaluation_data_are_refused_for_training(path: str) -> None:
    with pytest.raises(AvsmError, match="may not be used for training") as e:
        check_training_sources(["../shared/data/ixi185/IXI012-HH-1211_T1.nii.gz", path])
    assert path in str(e.value)
    check_training_sources(["../shared/data/ixi185/IXI012-HH-1211_T1.nii.gz",
                            "../shared/data/synthseg-label-maps/training_seg_01.nii.gz"])
