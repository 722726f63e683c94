"""Registration on real brains: known affine recovery, geometry round trip, vSVF improves Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from avsm.api import identity_result, register
from avsm.core.sampling import compose
from avsm.io.image import Volume, load_image, save_image
from avsm.metrics.overlap import dice_per_label, mean_dice
from avsm.optim.affine_opt import AffineOptConfig
from avsm.optim.vsvf_opt import VSVFOptConfig
from avsm.transform import apply_homogeneous

DATA = Path(__file__).parent / "data"


def _random_affine(seed: int, img: sitk.Image) -> sitk.AffineTransform:
    """Rotation ≤ 15°, scale 0.9–1.1, translation ≤ 10 % of the field, about the image centre."""
    rng = np.random.default_rng(seed)
    angles = np.deg2rad(rng.uniform(-15, 15, 3))
    R = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    S = np.diag(rng.uniform(0.9, 1.1, 3))
    M = np.asarray(R).reshape(3, 3) @ S
    extent = np.array(img.GetSpacing()) * (np.array(img.GetSize()) - 1)
    t = rng.uniform(-0.1, 0.1, 3) * extent
    centre = img.TransformContinuousIndexToPhysicalPoint((np.array(img.GetSize()) - 1) / 2.0)
    T = sitk.AffineTransform(3)
    T.SetMatrix(M.ravel().tolist())
    T.SetCenter(centre)
    T.SetTranslation(t.tolist())
    return T


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_random_affine_on_real_brain(seed):
    torch.manual_seed(0)
    fixed_img = sitk.ReadImage(str(DATA / "colin_4mm.nii.gz"), sitk.sitkFloat32)
    T = _random_affine(seed, fixed_img)
    # moving(x) = fixed(T(x)); the registration map (fixed -> moving space) is then T^-1
    moving_img = sitk.Resample(fixed_img, fixed_img, T, sitk.sitkLinear, 0.0)
    fixed = Volume.from_sitk(fixed_img)
    moving = Volume.from_sitk(moving_img)
    res = register(fixed=fixed, moving=moving, method="affine", progress=False,
                   affine_config=AffineOptConfig(iterations=(150, 150, 40)))
    wm = res.world_map()[0].numpy().reshape(3, -1).T  # world points in moving space
    Tinv = T.GetInverse()
    brain = sitk.GetArrayFromImage(fixed_img).reshape(-1) > 20
    idx = np.argwhere(sitk.GetArrayFromImage(fixed_img) > 20)
    pts = [fixed_img.TransformIndexToPhysicalPoint(tuple(int(v) for v in i[::-1])) for i in idx[::7]]
    truth = np.array([Tinv.TransformPoint(p) for p in pts])
    got = wm[brain][::7]
    err = np.linalg.norm(got - truth, axis=1)
    # 4 mm voxels: mean error below 1 mm (a quarter voxel), max below 2.5 mm over the brain
    assert err.mean() < 1.0, err.mean()
    assert np.percentile(err, 99) < 2.5, np.percentile(err, 99)
    # and the physical identity start was far from it
    before = np.linalg.norm(np.array(pts) - truth, axis=1)
    assert before.mean() > 4.0


def _oblique_image() -> sitk.Image:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "colin_4mm.nii.gz"), sitk.sitkFloat32))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.5, 4.2, 5.0))
    img.SetOrigin((-91.0, 37.5, 12.25))
    R = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()
    img.SetDirection(R)
    return img


def test_geometry_round_trip_oblique_anisotropic(tmp_path):
    img = _oblique_image()
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(img, str(path))
    vol = load_image(path)
    res = register(fixed=vol, moving=vol, method="affine", progress=False,
                   affine_config=AffineOptConfig(iterations=(30, 20, 10)))
    warped = res.warp(vol)
    out = tmp_path / "warped.nii.gz"
    save_image(warped, out)
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == img.GetSize()
    assert np.allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-5)
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    # self-registration stays at the identity: the warped image equals the input inside the brain
    a = sitk.GetArrayFromImage(back)
    b = sitk.GetArrayFromImage(img)
    inner = (slice(3, -3),) * 3
    rel = np.abs(a[inner] - b[inner]).mean() / np.abs(b[inner]).mean()
    assert rel < 0.05, rel
    wm = res.world_map()[0].numpy().reshape(3, -1).T
    pts = np.array([img.TransformIndexToPhysicalPoint((i, j, k)) for k in range(0, 46, 9)
                    for j in range(0, 55, 9) for i in range(0, 46, 9)])
    sel = [np.ravel_multi_index((k, j, i), (46, 55, 46)) for k in range(0, 46, 9)
           for j in range(0, 55, 9) for i in range(0, 46, 9)]
    assert np.abs(wm[sel] - pts).max() < 2.0  # mm, on 3.5-5 mm voxels


def test_physical_identity_handles_different_orientations():
    """The same brain stored LPS and flipped/permuted (RAS-like) starts perfectly aligned."""
    img = sitk.ReadImage(str(DATA / "colin_4mm.nii.gz"), sitk.sitkFloat32)
    flipped = sitk.DICOMOrient(img, "RAI")
    permuted = sitk.DICOMOrient(img, "SPL")
    fixed = Volume.from_sitk(img)
    for other in (flipped, permuted):
        moving = Volume.from_sitk(other)
        res = identity_result(fixed, moving)
        warped = res.warp(moving)
        diff = np.abs(warped.array - fixed.array)[2:-2, 2:-2, 2:-2]
        assert diff.max() < 1e-3 * fixed.array.max()


def test_vsvf_opt_improves_dice_over_affine_with_no_folds():
    fixed = load_image(DATA / "mni_4mm.nii.gz")
    moving = load_image(DATA / "colin_4mm.nii.gz")
    fl = load_image(DATA / "mni_4mm_labels.nii.gz", label=True)
    ml = load_image(DATA / "colin_4mm_labels.nii.gz", label=True)
    res = register(fixed=fixed, moving=moving, method="opt", progress=False,
                   affine_config=AffineOptConfig(iterations=(100, 40, 10)),
                   vsvf_config=VSVFOptConfig(scales=(1.0,), iterations=(10,)))
    d_aff = mean_dice(dice_per_label(res.warp(ml, affine_only=True).array, fl.array))
    d = mean_dice(dice_per_label(res.warp(ml).array, fl.array))
    assert d > d_aff + 0.01, (d, d_aff)
    assert (res.jacobian_determinant() < 0).sum() == 0
    assert res.folds() == 0
    # the inverse map undoes the forward map (mm, inside the brain box)
    fwd = res.world_map()  # fixed grid -> moving world
    back = _compose_world(res, fwd)
    ref = identity_result(fixed, fixed).world_map()
    err = (back - ref).norm(dim=1)[0, 6:-6, 6:-6, 6:-6]
    assert float(err.mean()) < 0.5, float(err.mean())  # mm on 4 mm voxels


def _compose_world(res, world_pts: torch.Tensor) -> torch.Tensor:
    """Apply the inverse transform to world points in moving space: returns fixed-space points."""
    mg = res.moving_grid
    u = apply_homogeneous(mg.world_to_unit(), world_pts)
    unit_fixed = compose(res.phi_inv.double(), u)
    return apply_homogeneous(res.fixed_grid.unit_to_world(), unit_fixed)

