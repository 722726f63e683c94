"""Images far apart in world space: the automatic initialisation, ``--init FILE`` and ``--init header``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from avsm.api import initialise, prepare_pair, register
from avsm.core.coords import centred_to_homogeneous
from avsm.io.geometry import unit_affine_between
from avsm.io.image import Volume
from avsm.metrics.overlap import dice_per_label, mean_dice
from test_initialise import _rotation  # the same axis rotations

DATA = Path(__file__).parent / "data"


def _read(name: str, label: bool = False) -> sitk.Image:
    return sitk.ReadImage(str(DATA / name), sitk.sitkInt16 if label else sitk.sitkFloat32)


def _moved(img: sitk.Image, R: np.ndarray, t: np.ndarray) -> sitk.Image:
    """The same voxels placed elsewhere: the header's direction turned by ``R`` about the image centre, origin
    shifted by ``t`` (mm).  A world point ``x`` of the original is at ``R (x - c) + c + t`` in the copy."""
    out = sitk.Image(img)
    D = np.asarray(img.GetDirection()).reshape(3, 3)
    c = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    o = np.asarray(img.GetOrigin())
    out.SetDirection((R @ D).ravel().tolist())
    out.SetOrigin((R @ (o - c) + c + t).tolist())
    return out


def _dice(fixed, fixed_lab, moving, moving_lab) -> float:
    res = register(fixed=Volume.from_sitk(fixed), moving=Volume.from_sitk(moving), method="affine",
                   spacing=4.0, progress=False)
    w = res.warp(Volume.from_sitk(moving_lab, is_label=True))
    return mean_dice(dice_per_label(w.array, sitk.GetArrayFromImage(fixed_lab)))


@pytest.fixture(scope="module")
def brains():
    return (_read("mni_4mm.nii.gz"), _read("mni_4mm_labels.nii.gz", True),
            _read("colin_4mm.nii.gz"), _read("colin_4mm_labels.nii.gz", True))


@pytest.fixture(scope="module")
def reference_dice(brains) -> float:
    return _dice(*brains)


@pytest.mark.parametrize("case", ["translate300", "rot30x", "rot30y", "rot30z"])
def test_large_offsets_recovered(brains, reference_dice, case: str) -> None:
    fi, fl, mi, ml = brains
    if case == "translate300":
        R, t = np.eye(3), np.array([300.0, -300.0, 300.0])
    else:
        R, t = _rotation("xyz".index(case[-1]), 30.0), np.array([40.0, -25.0, 60.0])
    mi2, ml2 = _moved(mi, R, t), _moved(ml, R, t)
    # without the initialisation the pair barely overlaps, or not at all
    res = register(fixed=Volume.from_sitk(fi), moving=Volume.from_sitk(mi2), method="affine", init="header",
                   spacing=4.0, progress=False)
    d_header = mean_dice(dice_per_label(res.warp(Volume.from_sitk(ml2, is_label=True)).array,
                                        sitk.GetArrayFromImage(fl)))
    d = _dice(fi, fl, mi2, ml2)
    assert d > reference_dice - 0.01, (case, d, reference_dice)
    assert d_header < reference_dice - 0.1, (case, d_header)


def test_header_axis_flip_is_the_same_image(brains, reference_dice) -> None:
    """Voxels re-ordered with the header to match (RAI, SPL): nothing moves, Dice as unmoved."""
    fi, fl, mi, ml = brains
    for orient in ("RAI", "SPL"):
        d = _dice(fi, fl, sitk.DICOMOrient(mi, orient), sitk.DICOMOrient(ml, orient))
        assert abs(d - reference_dice) < 0.01, (orient, d, reference_dice)


def test_init_header_reproduces_the_physical_identity(brains) -> None:
    fi, _, mi, _ = brains
    pair = prepare_pair(Volume.from_sitk(fi), Volume.from_sitk(mi), spacing=4.0)
    A0, b0, rec = initialise(pair, "header")
    assert rec["chosen"] == "header"
    M = centred_to_homogeneous(A0.double(), b0.double())[0].numpy()
    assert np.allclose(M, unit_affine_between(pair.fixed_grid, pair.moving_grid), atol=1e-6)


def test_init_file_is_applied_in_ants_order(tmp_path: Path, brains) -> None:
    """An ANTs/ITK affine file as ``--init``: the start map sends a fixed point x to T(x), as
    ``antsRegistration --initial-moving-transform`` (and antsApplyTransforms) apply it."""
    fi, _, mi, _ = brains
    T = sitk.AffineTransform(3)
    T.SetMatrix((_rotation(2, 10.0) @ np.diag([1.05, 0.95, 1.0])).ravel().tolist())
    T.SetCenter((5.0, -10.0, 12.0))
    T.SetTranslation((7.0, -3.0, 11.0))
    path = tmp_path / "init_0GenericAffine.mat"
    sitk.WriteTransform(T, str(path))
    pair = prepare_pair(Volume.from_sitk(fi), Volume.from_sitk(mi), spacing=4.0)
    for spec, tx in ((str(path), T), (f"[{path},1]", T.GetInverse())):
        A0, b0, rec = initialise(pair, spec)
        assert rec["chosen"] == "file"
        M = centred_to_homogeneous(A0.double(), b0.double())[0].numpy()
        W = pair.moving_grid.unit_to_world() @ M @ pair.fixed_grid.world_to_unit()
        for x in ([0.0, 0.0, 0.0], [-60.0, 40.0, 25.0], [30.0, -80.0, -10.0]):
            want = np.asarray(tx.TransformPoint(x))
            assert np.allclose(W[:3, :3] @ np.asarray(x) + W[:3, 3], want, atol=1e-4)
    # a displacement field is refused as an initial transform
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    sitk.WriteImage(field, str(tmp_path / "warp.nii.gz"))
    from avsm.errors import AvsmError

    with pytest.raises(AvsmError, match="linear"):
        initialise(pair, str(tmp_path / "warp.nii.gz"))
