"""Clinical options end to end: rigid, masks, mutual information, CT handling, DICOM inputs, Dice warnings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from avsm.api import detect_modality, normalise_ct, register, working_grid_for
from avsm.cli.main import main
from avsm.io.image import Volume, load_image

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rigid(deg: tuple[float, float, float], t: tuple[float, float, float], centre) -> sitk.Euler3DTransform:
    T = sitk.Euler3DTransform()
    T.SetCenter(tuple(float(c) for c in centre))
    T.SetRotation(*np.deg2rad(deg))
    T.SetTranslation(t)
    return T


def _rotation_error_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0))))


def test_rigid_recovers_a_known_rigid_motion_of_a_real_brain() -> None:
    """< 0.5° and < 0.5 mm, and the result is rigid in millimetres (orthogonal world matrix)."""
    if not (SHARED / "colin27_brain.nii.gz").exists():
        pytest.skip("needs ../shared/data/colin27_brain.nii.gz (the 1 mm real brain; not shipped)")
    img = sitk.ReadImage(str(SHARED / "colin27_brain.nii.gz"), sitk.sitkFloat32)
    img = sitk.Resample(img, [int(s * sp / 2.0) for s, sp in zip(img.GetSize(), img.GetSpacing())],
                        sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (2.0, 2.0, 2.0), img.GetDirection())
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    T = _rigid((6.0, -4.0, 8.0), (7.0, -5.0, 4.0), centre)
    moving = sitk.Resample(img, img, T, sitk.sitkLinear, 0.0)  # moving(x) = fixed(T x): the map is T^-1
    res = register(fixed=Volume.from_sitk(img), moving=Volume.from_sitk(moving), method="opt",
                   transform="rigid", init="header", progress=False)
    from avsm.export.itk import world_affine

    W = world_affine(res)  # fixed world -> moving world
    Tinv = T.GetInverse()
    want = np.eye(4)
    want[:3, :3] = np.asarray(Tinv.GetMatrix()).reshape(3, 3)
    want[:3, 3] = np.asarray(Tinv.TransformPoint((0.0, 0.0, 0.0)))
    assert np.allclose(W[:3, :3] @ W[:3, :3].T, np.eye(3), atol=1e-4)  # rigid in mm
    rot_err = _rotation_error_deg(W[:3, :3] @ want[:3, :3].T)
    arr = sitk.GetArrayFromImage(img)
    idx = np.argwhere(arr > np.percentile(arr, 70))[::50]
    pts = np.array([img.TransformIndexToPhysicalPoint(tuple(int(v) for v in i[::-1])) for i in idx])
    err = np.linalg.norm(pts @ W[:3, :3].T + W[:3, 3] - (pts @ want[:3, :3].T + want[:3, 3]), axis=1)
    assert rot_err < 0.5, rot_err
    assert err.mean() < 0.5, err.mean()
    start = np.linalg.norm(pts - (pts @ want[:3, :3].T + want[:3, 3]), axis=1)
    assert start.mean() > 5.0  # there was a real motion to recover


def test_fixed_mask_stops_a_local_change_from_pulling_the_map() -> None:
    """A blob added to the moving image (a 'lesion') pulls the map unless it is masked out."""
    fixed = load_image(DATA / "mni_4mm.nii.gz")
    arr = fixed.array.copy()
    D, H, W = arr.shape
    z, y, x = np.mgrid[0:D, 0:H, 0:W]
    centre = np.array([D // 2, H // 2 + 4, W // 2 + 6])
    r2 = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    blob = r2 <= 16
    lesion = arr.copy()
    lesion[blob] = arr.max()  # bright lesion in the moving image only
    moving = fixed.with_array(lesion.astype(np.float32))
    mask = fixed.with_array((r2 > 49).astype(np.uint8), is_label=True)  # fixed-space mask excludes it
    kw = dict(fixed=fixed, moving=moving, method="opt", init="header", progress=False)
    free = register(**kw)
    masked = register(**kw, fixed_mask=mask)

    def displacement(res) -> np.ndarray:
        from avsm.transform import grid_world_points

        d = (res.world_map() - grid_world_points(fixed.grid)).norm(dim=1)[0].numpy()
        return d

    near = r2 <= 36
    d_free, d_masked = displacement(free)[near].mean(), displacement(masked)[near].mean()
    assert d_free > 1.0, d_free  # the lesion drags the unmasked registration
    assert d_masked < 0.5 * d_free, (d_masked, d_free)


def test_mutual_information_registers_a_multi_modal_pair() -> None:
    """An inverted-contrast copy (a crude second modality) shifted by a known amount: MI recovers it."""
    img = sitk.ReadImage(str(DATA / "colin_4mm.nii.gz"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    brain = arr > 0.05 * arr.max()
    inv = np.where(brain, arr.max() * 1.1 - arr, 0.0).astype(np.float32)  # bright CSF-like contrast
    other = sitk.GetImageFromArray(inv)
    other.CopyInformation(img)
    T = sitk.TranslationTransform(3, (6.0, -4.0, 5.0))
    moving = sitk.Resample(other, img, T, sitk.sitkLinear, 0.0)
    res = register(fixed=Volume.from_sitk(img), moving=Volume.from_sitk(moving), method="opt",
                   transform="rigid", similarity="mi", init="header", progress=False)
    from avsm.export.itk import world_affine

    W = world_affine(res)  # moving(x) = other(x + t), so the map is x -> x - t
    assert np.allclose(W[:3, 3], [-6.0, 4.0, -5.0], atol=1.0), W
    assert _rotation_error_deg(W[:3, :3]) < 2.0


def test_ct_detection_window_and_grid() -> None:
    rng = np.random.default_rng(0)
    ct = np.full((20, 30, 30), -1000.0, dtype=np.float32)
    ct[:, 5:25, 5:25] = rng.normal(40, 20, size=(20, 20, 20))  # soft tissue
    ct[:, 10:14, 10:14] = 700.0  # bone
    ct[:, :, :2] = -2048.0  # scanner padding
    g = load_image(DATA / "mni_4mm.nii.gz").grid.resized((20, 30, 30))
    vol = Volume(ct, g)
    assert detect_modality(vol) == "ct"
    mr = load_image(DATA / "mni_4mm.nii.gz")
    assert detect_modality(mr) == "mr"
    w = normalise_ct(ct)
    assert w[0, 0, 0] == 0.0 and w[0, 10, 0] == 0.0  # padding and air are background
    assert abs(float(w[0, 11, 11]) - 0.85) < 1e-6 and 0.4 < float(w[0, 15, 20]) < 0.6
    # thick slices keep their spacing on the working grid; thin ones go to 2 mm
    thick = g.resized((20, 30, 30))
    thick = type(thick)(thick.shape, (0.7, 0.7, 5.0), thick.origin, thick.direction)
    wg = working_grid_for(thick, spacing=2.0, keep_thick_slices=True)
    iso = working_grid_for(thick, spacing=2.0)
    assert max(iso.spacing) <= 2.0 + 1e-6  # 2 mm everywhere: 5 mm slices would be interpolated
    assert 2.5 < max(wg.spacing) <= 5.0 + 1e-6  # at most the own 5 mm (rounded up to a multiple of 16 slices)
    assert min(wg.spacing) <= 2.0 and wg.shape[0] < iso.shape[0]


def test_auto_modality_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    fixed = load_image(DATA / "mni_4mm.nii.gz")
    with caplog.at_level(logging.INFO, logger="avsm.api"):
        res = register(fixed=fixed, moving=fixed, method="affine", progress=False)
    assert res.info["modality"] == {"fixed": "mr", "moving": "mr"}
    assert any("looks like MR" in r.message for r in caplog.records)


def _write_series(vol_img: sitk.Image, folder: Path, uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(vol_img, sitk.sitkInt16)
    D = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, val in (("0020|000e", uid), ("0020|000d", "1.2.3.4"), ("0008|0060", "MR"),
                         ("0020|0052", "1.2.3.5"), ("0020|0013", str(k + 1)),
                         ("0020|0032", "\\".join(f"{v:.6f}" for v in pos)),
                         ("0020|0037", "\\".join(f"{v:.6f}" for v in (D[0], D[3], D[6], D[1], D[4], D[7]))),
                         ("0028|0030", f"{img.GetSpacing()[1]:.6f}\\{img.GetSpacing()[0]:.6f}"),
                         ("0018|0050", f"{img.GetSpacing()[2]:.6f}"),
                         ("0008|0018", f"{uid}.{k + 1}")):
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)


def test_register_cli_reads_dicom_folder_and_warns_on_disjoint_labels(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    src = sitk.ReadImage(str(DATA / "mni_4mm.nii.gz"))
    src = sitk.Cast(sitk.RescaleIntensity(src, 0, 1000), sitk.sitkInt16)
    _write_series(src, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1")
    lab = sitk.ReadImage(str(DATA / "mni_4mm_labels.nii.gz"))
    other = sitk.Cast(lab, sitk.sitkInt16) + 1000 * sitk.Cast(lab > 0, sitk.sitkInt16)  # no shared value
    sitk.WriteImage(other, str(tmp_path / "other_labels.nii.gz"))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = main(["register", "--fixed", str(DATA / "mni_4mm.nii.gz"), "--moving", str(tmp_path / "dicom"),
                   "--out-dir", str(out), "--method", "affine", "--affine-iterations", "2,2,2", "--quiet",
                   "--fixed-labels", str(DATA / "mni_4mm_labels.nii.gz"),
                   "--moving-labels", str(tmp_path / "other_labels.nii.gz")])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "mean_dice" not in summary
    assert any("share no label value" in r.message for r in caplog.records)
    assert (out / "warped.nii.gz").exists()


@pytest.mark.parametrize("bad", ["offgrid", "empty", "values"])
def test_bad_masks_fail_with_one_line_and_no_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     bad: str) -> None:
    fixed = sitk.ReadImage(str(DATA / "mni_4mm.nii.gz"))
    arr = (sitk.GetArrayFromImage(fixed) > 0).astype(np.uint8)
    if bad == "empty":
        arr[:] = 0
    if bad == "values":
        arr = arr * 3
    m = sitk.GetImageFromArray(arr)
    m.CopyInformation(fixed)
    if bad == "offgrid":
        m.SetOrigin(tuple(o + 8.0 for o in fixed.GetOrigin()))
    mp = tmp_path / "mask.nii.gz"
    sitk.WriteImage(m, str(mp))
    out = tmp_path / "out"
    rc = main(["register", "--fixed", str(DATA / "mni_4mm.nii.gz"), "--moving", str(DATA / "colin_4mm.nii.gz"),
               "--out-dir", str(out), "--fixed-mask", str(mp), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "mask.nii.gz" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_tumour_mask_stops_a_deformation_inside_a_real_tumour() -> None:
    """A real tumour brain (radiomics_brain1 and its outline); the moving image differs from the
    fixed one only by a known 5 mm push inside the tumour.  Unmasked, the registration follows
    the push; with the tumour masked out of both images (as ``antsRegistration -x``), the map
    inside the tumour stays where its surroundings put it."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    from avsm.transform import grid_world_points

    if not (SHARED / "radiomics_brain1.nrrd").exists():
        pytest.skip(f"needs {SHARED / 'radiomics_brain1.nrrd'} (../shared/data)")
    fixed = load_image(SHARED / "radiomics_brain1.nrrd")
    tumour = load_image(SHARED / "radiomics_brain1_tumour.nrrd", label=True).array > 0
    # smooth in-plane push confined to the tumour (blurred indicator, voxel sigmas (z, y, x))
    bump = gaussian_filter(tumour.astype(np.float64), sigma=(0.7, 4.0, 4.0))
    bump /= bump.max()
    d_mm = 5.0 * bump  # mm, along the image's first (x) axis
    idx = np.indices(fixed.array.shape).astype(np.float64)
    idx[2] += d_mm / fixed.grid.spacing[0]
    from scipy.ndimage import map_coordinates

    moving = fixed.with_array(map_coordinates(fixed.array, idx, order=1, mode="nearest").astype(np.float32))
    outside = ~binary_dilation(bump > 0.02, iterations=2)
    mask = fixed.with_array(outside.astype(np.uint8), is_label=True)
    kw = dict(fixed=fixed, moving=moving, method="opt", init="header", progress=False)
    free = register(**kw)
    masked = register(**kw, fixed_mask=mask, moving_mask=mask)

    core = bump > 0.5

    def push(res) -> float:
        d = (res.world_map() - grid_world_points(fixed.grid)).norm(dim=1)[0].numpy()
        return float(d[core].mean())

    p_free, p_masked = push(free), push(masked)
    assert p_free > 1.5, p_free  # the unmasked map follows the push (truth: 2.5-5 mm in the core)
    assert p_masked < 0.4 * p_free, (p_masked, p_free)
