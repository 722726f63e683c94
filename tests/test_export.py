"""Cross-tool tests of avsm.export: ANTs/ITK transforms written by avsm, applied by
SimpleITK and antspyx, agree with avsm's own warp and world map.

Fixtures are oblique, anisotropic, with offset origins, and the fixed and moving
images have different geometry.  The registration result is built by hand (a known
world affine after a known smooth displacement), so no optimisation runs.

Bounds asserted (measured values are logged with ``-o log_cli=true``):

* warped image, exported transform via ``sitk.Resample`` / ``ants.apply_transforms``
  vs ``result.warp``: max abs difference < 1e-3 of the moving intensity range, on the
  voxels whose sampling point lies inside the moving image (the "overlap");
* mapped points at fixed voxel centres vs ``result.world_map``: < 1e-3 mm;
* inverse ∘ forward at interior fixed voxel centres: < 0.05 mm (the inverse fields
  are sampled off their grid nodes, so their trilinear interpolation error enters).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from avsm.api import RegistrationResult, identity_result
from avsm.core.coords import affine_map, homogeneous_to_centred, identity_map
from avsm.errors import AvsmError
from avsm.export.itk import (
    ROLES,
    export_fields,
    grid_world_points,
    l2r_displacement,
    load_transform,
    parse_transform_spec,
    transform_paths_for_prefix,
    world_affine,
    write_transforms,
)
from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image
from avsm.io.outputs import OutputTransaction

log = logging.getLogger(__name__)

CENTRE = np.array([5.0, -3.0, 40.0])


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def make_grid(size_xyz, spacing, R, shift=(0.0, 0.0, 0.0)) -> Grid:
    """A grid centred near CENTRE (plus ``shift``) with direction ``R``."""
    half = np.asarray(spacing) * (np.asarray(size_xyz) - 1) / 2
    origin = CENTRE + np.asarray(shift) - R @ half
    return Grid(shape=(size_xyz[2], size_xyz[1], size_xyz[0]), spacing=spacing,
                origin=tuple(origin), direction=tuple(R.reshape(-1)))


def pattern(points: np.ndarray) -> np.ndarray:
    """Smooth test intensity at world points ``(3, ...)``."""
    x, y, z = points
    return (np.sin(x / 4.0) + np.cos(y / 5.0) + 0.7 * np.sin(z / 3.5 + x / 9.0) + 3.0).astype(np.float32)


def smooth_disp(p: np.ndarray) -> np.ndarray:
    """Smooth displacement (mm) at world points ``(3, ...)``; |grad| < 0.2."""
    x, y, z = p
    return np.stack([1.2 * np.sin(y / 7.0 + 0.3), 0.9 * np.cos(z / 6.0), 1.0 * np.sin(x / 8.0 - 0.2)])


def apply_h(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    flat = pts.reshape(3, -1)
    return (M[:3, :3] @ flat + M[:3, 3:4]).reshape(pts.shape)


def world_of(grid: Grid) -> np.ndarray:
    """World points of ``grid``'s unit identity map, ``(3, D, H, W)``."""
    u = identity_map(grid.shape, dtype=torch.float64)[0].numpy()
    return apply_h(grid.unit_to_world(), u)


def hand_result(fixed: Volume, moving: Volume, P: np.ndarray) -> RegistrationResult:
    """total(x) = P(x + s(x)) in world mm, as an avsm result on the working grids."""
    res = identity_result(fixed, moving)
    fg, mg = res.fixed_grid, res.moving_grid
    H = mg.world_to_unit() @ P @ fg.unit_to_world()
    A, b = homogeneous_to_centred(torch.as_tensor(H)[None])
    xw = world_of(fg)
    phi = apply_h(mg.world_to_unit(), apply_h(P, xw + smooth_disp(xw)))
    yw = world_of(mg)
    z = apply_h(np.linalg.inv(P), yw)
    x = z.copy()
    for _ in range(60):  # x + s(x) = z, contraction since |grad s| < 1
        x = z - smooth_disp(x)
    phi_inv = apply_h(fg.world_to_unit(), x)
    res.A, res.b = A.float(), b.float()
    res.phi = torch.from_numpy(phi)[None].float()
    res.phi_inv = torch.from_numpy(phi_inv)[None].float()
    res.phi_affine = affine_map(A, b, fg.shape).float()
    res.method = "hand"
    return res


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("export")
    fgrid = make_grid((14, 12, 9), (1.3, 0.9, 2.1), rotation(0.3, -0.2, 0.5))
    mgrid = make_grid((17, 15, 11), (1.1, 1.2, 1.9), rotation(-0.25, 0.35, -0.4), shift=(0.8, -0.6, 0.5))
    fixed = Volume(pattern(grid_world_points(fgrid) * 1.1), fgrid, str(d / "fixed.nii.gz"))
    moving = Volume(pattern(grid_world_points(mgrid)), mgrid, str(d / "moving.nii.gz"))
    sitk.WriteImage(fixed.to_sitk(), fixed.path)
    sitk.WriteImage(moving.to_sitk(), moving.path)
    P = np.eye(4)
    P[:3, :3] = rotation(0.06, -0.04, 0.08) @ np.diag([1.04, 0.97, 1.02])
    P[:3, 3] = [0.7, -0.5, 0.4]
    P[:3, 3] += CENTRE - P[:3, :3] @ CENTRE
    result = hand_result(fixed, moving, P)
    prefix = str(d / "out" / "pair_")
    with OutputTransaction(inputs=[fixed.path, moving.path]) as tx:
        files = write_transforms(result, prefix, tx, formats=("ants", "composite", "tfm", "l2r"))
    return {"dir": d, "fixed": fixed, "moving": moving, "result": result, "P": P,
            "prefix": prefix, "files": files}


def overlap(result: RegistrationResult, grid: Grid, image_grid: Grid, *, inverse: bool = False) -> np.ndarray:
    """Voxels of ``grid`` whose sampling point lies inside ``image_grid`` (interior, index space)."""
    wm = result.world_map(grid, inverse=inverse)[0].numpy()
    idx = apply_h(np.linalg.inv(image_grid.index_to_world()), wm)  # (3 [x,y,z], D, H, W)
    inside = np.ones(grid.shape, bool)
    for c, n in enumerate(image_grid.itk_size):
        inside &= (idx[c] >= 1e-4) & (idx[c] <= n - 1 - 1e-4)
    return inside


def sitk_warp(image: Volume, reference: Grid, tr: sitk.Transform) -> np.ndarray:
    out = sitk.Resample(image.to_sitk(), reference.reference_image(sitk.sitkFloat32), tr,
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def rel_err(a: np.ndarray, b: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> float:
    assert mask.sum() > 50, "fixture overlap too small"
    return float(np.abs(a - b)[mask].max() / (ref.max() - ref.min()))


# --------------------------------------------------------------------------- tests


def test_files_and_geometry(case: dict) -> None:
    files, prefix = case["files"], case["prefix"]
    # a hand-made result has no velocities; the .h5 composites are tested in test_export_h5.py
    assert set(files) == set(ROLES) - {"compact", "composite_h5", "inverse_composite_h5"}
    for role, p in files.items():
        assert p == prefix + ROLES[role] and os.path.isfile(p)
    assert not any(n.startswith(".avsm-tmp") for n in os.listdir(os.path.dirname(prefix)))
    fgrid, mgrid = case["fixed"].grid, case["moving"].grid
    for role, grid in (("warp", fgrid), ("inverse_warp", fgrid), ("composite", fgrid),
                       ("inverse_composite", mgrid)):
        img = sitk.ReadImage(files[role])
        assert img.GetNumberOfComponentsPerPixel() == 3
        assert Grid.from_sitk(img).is_close(grid, 1e-5), role
        r = sitk.ImageFileReader()
        r.SetFileName(files[role])
        r.ReadImageInformation()
        assert r.GetMetaData("intent_code") == "1007"  # NIFTI_INTENT_VECTOR, as ITK/ANTs write


def test_affine_mat_round_trip(case: dict) -> None:
    files, P = case["files"], case["P"]
    M = world_affine(case["result"])
    assert np.allclose(M, P, atol=1e-4)
    for role in ("affine", "affine_tfm"):
        tr = sitk.ReadTransform(files[role])
        aff = sitk.AffineTransform(tr)
        assert "AffineTransform_double_3_3" in tr.GetName() or tr.GetName() == "AffineTransform"
        for p in grid_world_points(case["fixed"].grid).reshape(3, -1).T[::37]:
            assert np.allclose(aff.TransformPoint(tuple(p)), apply_h(M, p[:, None])[:, 0], atol=1e-6)
    with open(files["affine"], "rb") as fh:
        head = fh.read(200)
    assert b"AffineTransform_double_3_3" in head  # MATLAB v4 file as ANTs writes


@pytest.mark.parametrize("spec", ["pair", "composite"])
def test_points_match_world_map(case: dict, spec: str) -> None:
    files, result, fixed = case["files"], case["result"], case["fixed"]
    tr = load_transform([files["warp"], files["affine"]] if spec == "pair" else [files["composite"]])
    wm = result.world_map()[0].numpy().reshape(3, -1)
    pts = grid_world_points(fixed.grid).reshape(3, -1)
    err = max(np.linalg.norm(np.array(tr.TransformPoint(tuple(pts[:, i]))) - wm[:, i])
              for i in range(0, pts.shape[1], 7))
    log.info("points %s: max |exported - world_map| = %.2e mm", spec, err)
    assert err < 1e-3


def test_forward_warp_sitk_and_ants(case: dict) -> None:
    files, result, fixed, moving = case["files"], case["result"], case["fixed"], case["moving"]
    ref = result.warp(moving).array
    mask = overlap(result, fixed.grid, moving.grid)
    for lst in ([files["warp"], files["affine"]], [files["composite"]]):
        e = rel_err(sitk_warp(moving, fixed.grid, load_transform(lst)), ref, mask, moving.array)
        log.info("sitk forward %s: rel err %.2e", [os.path.basename(p) for p in lst], e)
        assert e < 1e-3
    ants = pytest.importorskip("ants")
    fi, mi = ants.image_read(fixed.path), ants.image_read(moving.path)
    for lst in ([files["warp"], files["affine"]], [files["composite"]]):
        out = ants.apply_transforms(fi, mi, transformlist=lst, interpolator="linear",
                                    whichtoinvert=[False] * len(lst)).numpy().transpose(2, 1, 0)
        e = rel_err(out, ref, mask, moving.array)
        log.info("ants forward %s: rel err %.2e", [os.path.basename(p) for p in lst], e)
        assert e < 1e-3


def test_ants_order_is_warp_then_affine(case: dict) -> None:
    """[Warp, Affine] applies the warp to the fixed point first: reversing it is wrong."""
    files, result, fixed, moving = case["files"], case["result"], case["fixed"], case["moving"]
    ref = result.warp(moving).array
    mask = overlap(result, fixed.grid, moving.grid)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(load_transform([files["warp"]]))
    comp.AddTransform(load_transform([files["affine"]]))  # applied first: Warp(Affine(x))
    assert rel_err(sitk_warp(moving, fixed.grid, comp), ref, mask, moving.array) > 1e-2


def test_inverse_warp_sitk_and_ants(case: dict) -> None:
    files, result, fixed, moving = case["files"], case["result"], case["fixed"], case["moving"]
    ref = result.warp(fixed, inverse=True).array
    mask = overlap(result, moving.grid, fixed.grid, inverse=True)
    lists = {"composite": ([files["inverse_composite"]], [False]),
             "pair": ([files["affine"], files["inverse_warp"]], [True, False])}
    bounds = {"composite": 1e-3, "pair": 1e-2}  # pair: the inverse warp is read off its nodes
    # [Affine^-1, InverseWarp]: outside the fixed box the warp field reads as 0 (ITK/ANTs)
    z = apply_h(np.linalg.inv(world_affine(result)), grid_world_points(moving.grid))
    idx = apply_h(np.linalg.inv(fixed.grid.index_to_world()), z)
    in_box = np.all([(idx[c] >= 0) & (idx[c] <= n - 1) for c, n in enumerate(fixed.grid.itk_size)], axis=0)
    masks = {"composite": mask, "pair": mask & in_box}
    for name, (lst, inv) in lists.items():
        e = rel_err(sitk_warp(fixed, moving.grid, load_transform(lst, invert=inv)), ref, masks[name],
                    fixed.array)
        log.info("sitk inverse %s: rel err %.2e", name, e)
        assert e < bounds[name]
    ants = pytest.importorskip("ants")
    fi, mi = ants.image_read(fixed.path), ants.image_read(moving.path)
    for name, (lst, inv) in lists.items():
        out = ants.apply_transforms(mi, fi, transformlist=lst, whichtoinvert=inv,
                                    interpolator="linear").numpy().transpose(2, 1, 0)
        e = rel_err(out, ref, masks[name], fixed.array)
        log.info("ants inverse %s: rel err %.2e", name, e)
        assert e < bounds[name]


def test_inverse_after_forward_is_identity(case: dict) -> None:
    files, fixed = case["files"], case["fixed"]
    fwd = load_transform([files["warp"], files["affine"]])
    invs = {"pair": load_transform([f"[{files['affine']},1]", files["inverse_warp"]]),
            "composite": load_transform([files["inverse_composite"]])}
    pts = grid_world_points(fixed.grid)[:, 1:-1, 1:-1, 1:-1].reshape(3, -1)
    # the inverse composite lives on the moving grid: keep points mapped inside it
    y = case["result"].world_map()[0].numpy()[:, 1:-1, 1:-1, 1:-1].reshape(3, -1)
    idx = apply_h(np.linalg.inv(case["moving"].grid.index_to_world()), y)
    inside = np.all([(idx[c] >= 0) & (idx[c] <= n - 1) for c, n in enumerate(case["moving"].grid.itk_size)],
                    axis=0)
    assert inside.sum() > 50
    for name, inv in invs.items():
        sel = pts.T if name == "pair" else pts.T[inside]
        err = max(np.linalg.norm(np.array(inv.TransformPoint(fwd.TransformPoint(tuple(p)))) - p)
                  for p in sel[::3])
        log.info("inverse(%s) o forward: max error %.3e mm", name, err)
        assert err < 0.05


def test_inverse_warp_is_exact_avsm_inverse(case: dict) -> None:
    """Affine(z + e(z)) == avsm's inverse at the nodes z where it was sampled."""
    fields = export_fields(case["result"])
    res, fixed = case["result"], case["fixed"]
    z = grid_world_points(fixed.grid)
    M = fields["affine"]
    y = apply_h(M, z)  # points in moving space
    x_exported = z + fields["inverse_warp"]  # [Affine^-1, InverseWarp] applied to y
    # avsm inverse at y, through a pseudo-grid of y
    from avsm.export.itk import _affine_image_grid

    x_avsm = res.world_map(_affine_image_grid(M, fixed.grid), inverse=True)[0].numpy()
    u = apply_h(res.moving_grid.world_to_unit(), y)
    in_box = ((u >= 0) & (u <= 1)).all(axis=0)  # elsewhere the forward warp is inverted instead
    assert in_box.sum() > 100
    assert np.abs(x_exported - x_avsm)[:, in_box].max() < 1e-9
    # outside, the fixed-point inverse of the forward warp: Warp(InverseWarp(z)) == z
    xi = apply_h(np.linalg.inv(fixed.grid.index_to_world()), x_exported)  # ITK reads 0 outside the field
    out = ~in_box & np.all([(xi[c] >= 0) & (xi[c] <= n - 1) for c, n in enumerate(fixed.grid.itk_size)], axis=0)
    if out.any():
        # exact inverse of avsm's forward warp d(x) = M^-1(total(x)) - x ...
        xx = torch.from_numpy(x_exported[:, out])[None]
        d = apply_h(np.linalg.inv(M), res.map_points(xx)[0].numpy()) - xx[0].numpy()
        err = np.abs(xx[0].numpy() + d - z[:, out]).max()
        log.info("inverse warp outside the moving box: |x + d(x) - z| <= %.2e mm", err)
        assert err < 1e-5
        # ... and of the written warp field up to its trilinear interpolation error
        fw = load_transform([case["files"]["warp"]])
        zz = z[:, out].T
        xq = x_exported[:, out].T
        err = max(np.linalg.norm(np.array(fw.TransformPoint(tuple(xq[i]))) - zz[i]) for i in range(0, len(zz), 3))
        log.info("inverse warp outside the moving box: |Warp(z + e(z)) - z| <= %.2e mm", err)
        assert err < 0.05
    # and the inverse composite agrees with world_map(inverse=True) on the moving grid
    inv = load_transform([case["files"]["inverse_composite"]])
    wm = res.world_map(inverse=True)[0].numpy().reshape(3, -1)
    pts = grid_world_points(case["moving"].grid).reshape(3, -1)
    err = max(np.linalg.norm(np.array(inv.TransformPoint(tuple(pts[:, i]))) - wm[:, i])
              for i in range(0, pts.shape[1], 11))
    assert err < 1e-3


def test_l2r(case: dict) -> None:
    files, result, fixed, moving = case["files"], case["result"], case["fixed"], case["moving"]
    img = sitk.ReadImage(files["l2r"])
    X, Y, Z = fixed.grid.itk_size
    assert img.GetSize() == (X, Y, Z, 3)  # nibabel shape (X, Y, Z, 3)
    assert img.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(img.GetSpacing()[:3], fixed.grid.spacing)
    assert np.allclose(img.GetOrigin()[:3], fixed.grid.origin)
    disp = sitk.GetArrayFromImage(img).transpose(0, 3, 2, 1)  # (3, X, Y, Z)
    assert np.allclose(disp, l2r_displacement(result), atol=1e-4)
    # units: moving voxel index of the mapped point minus the fixed voxel index
    from scipy.ndimage import map_coordinates

    ident = np.stack(np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij"))
    mov_xyz = moving.array.transpose(2, 1, 0)
    warped = map_coordinates(mov_xyz, ident + disp, order=1, mode="constant").transpose(2, 1, 0)
    mask = overlap(result, fixed.grid, moving.grid)
    assert rel_err(warped, result.warp(moving).array, mask, moving.array) < 1e-3


def test_identity_result_exports_identity(tmp_path: Path, case: dict) -> None:
    res = identity_result(case["fixed"], case["moving"])
    fields = export_fields(res)
    assert np.abs(fields["warp"]).max() < 1e-3
    assert np.abs(fields["inverse_warp"]).max() < 1e-3
    assert np.abs(fields["composite"]).max() < 1e-3
    assert np.allclose(fields["affine"], np.eye(4), atol=1e-5)


def test_write_is_atomic_and_validates(tmp_path: Path, case: dict) -> None:
    prefix = str(tmp_path / "p_")
    with pytest.raises(AvsmError, match="unknown transform format"):
        with OutputTransaction() as tx:
            write_transforms(case["result"], prefix, tx, formats=("bogus",))
    with pytest.raises(RuntimeError):
        with OutputTransaction() as tx:
            write_transforms(case["result"], prefix, tx, formats=("ants", "composite"))
            raise RuntimeError("crash after writing")
    assert os.listdir(tmp_path) == []


def test_load_transform_errors(tmp_path: Path, case: dict) -> None:
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"garbage")
    with pytest.raises(AvsmError) as e:
        load_transform([str(bad)])
    assert "bad.mat" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AvsmError, match="not found"):
        load_transform([str(tmp_path / "missing.tfm")])
    with pytest.raises(AvsmError, match="cannot be inverted"):
        load_transform([f"[{case['files']['warp']},1]"])
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(case["fixed"].to_sitk(), str(scalar))
    with pytest.raises(AvsmError, match="displacement field"):
        load_transform([str(scalar)])
    assert parse_transform_spec("[a b.mat, 1]") == ("a b.mat", True)
    assert parse_transform_spec("x.mat") == ("x.mat", False)
    assert transform_paths_for_prefix(case["prefix"]) == [(case["files"]["composite"], False)]
    assert transform_paths_for_prefix(str(tmp_path / "none_")) is None


def test_load_image_of_exported_field_rejected_as_image(case: dict) -> None:
    """A displacement field is not an image: load_image refuses it with one line."""
    with pytest.raises(AvsmError, match="vector image"):
        load_image(case["files"]["warp"])


# --------------------------------------------------------------------------- avsm warp


def test_cli_warp_image_and_labels(tmp_path: Path, case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from avsm.cli.main import main

    files, result, fixed, moving = case["files"], case["result"], case["fixed"], case["moving"]
    out = tmp_path / "w.nii.gz"
    rc = main(["warp", "--moving", moving.path, "--reference", fixed.path,
               "--transform", files["warp"], files["affine"], "--out", str(out)])
    assert rc == 0
    got = load_image(str(out))
    assert got.grid.is_close(fixed.grid, 1e-5)
    mask = overlap(result, fixed.grid, moving.grid)
    assert rel_err(got.array, result.warp(moving).array, mask, moving.array) < 1e-3
    # prefix form, inverse direction
    out2 = tmp_path / "back.nii.gz"
    assert main(["warp", "-m", fixed.path, "-r", moving.path, "-t", case["prefix"], "--inverse",
                 "-o", str(out2)]) == 0
    mask2 = overlap(result, moving.grid, fixed.grid, inverse=True)
    assert rel_err(load_image(str(out2)).array, result.warp(fixed, inverse=True).array, mask2,
                   fixed.array) < 1e-3
    # labels: never invents a label, keeps the dtype
    lab = (np.digitize(moving.array, [3.0, 4.0]) * 7).astype(np.int16)  # values {0, 7, 14}
    lab_path = tmp_path / "lab.nii.gz"
    sitk.WriteImage(Volume(lab, moving.grid).to_sitk(), str(lab_path))
    for interp in ("label", "nearest"):
        lo = tmp_path / f"lab_{interp}.nii.gz"
        assert main(["warp", "-m", str(lab_path), "-r", fixed.path, "-t", case["prefix"],
                     "--interp", interp, "-o", str(lo)]) == 0
        img = sitk.ReadImage(str(lo))
        assert img.GetPixelID() == sitk.sitkInt16
        assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 7, 14}
        assert len(np.unique(sitk.GetArrayFromImage(img))) == 3


def test_cli_warp_errors(tmp_path: Path, case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from avsm.cli.main import main

    files, fixed, moving = case["files"], case["fixed"], case["moving"]
    bad = tmp_path / "broken.tfm"
    bad.write_text("not a transform\n")
    out = tmp_path / "o.nii.gz"
    cases = [
        (["-t", str(bad)], "broken.tfm"),
        (["-t", str(tmp_path / "nope_")], "nope_"),
        (["-t", f"[{files['warp']},1]"], "1Warp.nii.gz"),
    ]
    for extra, name in cases:
        rc = main(["warp", "-m", moving.path, "-r", fixed.path, "-o", str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and name in err and "\n" not in err, err
        assert not out.exists()
    # output equal to an input is refused, the input untouched
    before = Path(moving.path).read_bytes()
    rc = main(["warp", "-m", moving.path, "-r", fixed.path, "-t", files["composite"], "-o", moving.path])
    assert rc == 2 and "overwrite an input" in capsys.readouterr().err
    assert Path(moving.path).read_bytes() == before


def test_load_h5_and_txt(tmp_path: Path, case: dict) -> None:
    files = case["files"]
    ref = load_transform([files["warp"], files["affine"]])
    comp = sitk.CompositeTransform(3)  # ITK order: last added applied first
    comp.AddTransform(sitk.ReadTransform(files["affine"]))
    comp.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(files["warp"]),
                                                                sitk.sitkVectorFloat64)))
    sitk.WriteTransform(comp, str(tmp_path / "comp.h5"))
    sitk.WriteTransform(sitk.ReadTransform(files["affine"]), str(tmp_path / "aff.txt"))
    t_h5 = load_transform([str(tmp_path / "comp.h5")])
    t_txt = load_transform([files["warp"], str(tmp_path / "aff.txt")])
    for p in grid_world_points(case["fixed"].grid).reshape(3, -1).T[::23]:
        q = np.array(ref.TransformPoint(tuple(p)))
        assert np.allclose(t_h5.TransformPoint(tuple(p)), q, atol=1e-6)
        assert np.allclose(t_txt.TransformPoint(tuple(p)), q, atol=1e-6)


def test_cli_warp_applies_ants_registration_output(tmp_path: Path, case: dict) -> None:
    """Transforms written by ANTs itself (SyN): avsm warp == ants.apply_transforms, both directions."""
    ants = pytest.importorskip("ants")
    from avsm.cli.main import main

    fixed, moving = case["fixed"], case["moving"]
    fi, mi = ants.image_read(fixed.path), ants.image_read(moving.path)
    reg = ants.registration(fi, mi, type_of_transform="SyN", reg_iterations=(4, 2), aff_iterations=(20, 5),
                            aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0),
                            outprefix=str(tmp_path / "ants_"), verbose=False)
    for p in reg["fwdtransforms"] + reg["invtransforms"]:
        if p.endswith(".nii.gz"):  # ANTs puts both Warp and InverseWarp on the fixed grid, as avsm does
            assert Grid.from_sitk(sitk.ReadImage(p)).is_close(fixed.grid, 1e-4), p
    for direction, (ref_img, mov_img, lst, inv) in {
        "forward": (fi, mi, reg["fwdtransforms"], [False] * len(reg["fwdtransforms"])),
        "inverse": (mi, fi, reg["invtransforms"], [p.endswith(".mat") for p in reg["invtransforms"]]),
    }.items():
        expected = ants.apply_transforms(ref_img, mov_img, transformlist=lst, whichtoinvert=inv,
                                         interpolator="linear").numpy().transpose(2, 1, 0)
        specs = [f"[{p},1]" if i else p for p, i in zip(lst, inv)]
        src, ref = (moving, fixed) if direction == "forward" else (fixed, moving)
        out = tmp_path / f"{direction}.nii.gz"
        assert main(["warp", "-m", src.path, "-r", ref.path, "-t", *specs, "-o", str(out)]) == 0
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        assert (expected != 0).mean() > 0.3  # a real overlap, not two empty images
        e = float(np.abs(got - expected).max() / (src.array.max() - src.array.min()))
        log.info("avsm warp vs ants.apply_transforms (%s, ANTs-written %s): rel err %.2e", direction,
                 [os.path.basename(p) for p in lst], e)
        assert e < 1e-3


def test_export_of_a_real_affine_registration(tmp_path: Path, case: dict) -> None:
    """A result from avsm.api.register (affine-opt, 2 iterations per scale) exports consistently."""
    from avsm.api import register
    from avsm.optim.affine_opt import AffineOptConfig

    fixed, moving = case["fixed"], case["moving"]
    res = register(fixed=fixed, moving=moving, method="affine", progress=False,
                   affine_config=AffineOptConfig(scales=(0.5, 1.0), iterations=(2, 2)))
    with OutputTransaction() as tx:
        files = write_transforms(res, str(tmp_path / "r_"), tx, formats=("ants", "avsm", "composite"))
    fields = export_fields(res)
    assert np.abs(fields["warp"]).max() < 1e-3  # affine only: the warp is (numerically) zero
    ref = res.warp(moving).array
    mask = overlap(res, fixed.grid, moving.grid)
    for lst in ([files["warp"], files["affine"]], [files["affine"]], [files["composite"]]):
        assert rel_err(sitk_warp(moving, fixed.grid, load_transform(lst)), ref, mask, moving.array) < 1e-3


# --------------------------------------------------------------------------- compact file, slabs


def steps_result(fixed: Volume, moving: Volume, P: np.ndarray, seed: int = 0,
                 integrators: tuple[str, ...] = ("ss", "rk4")):
    """A result defined by an affine ``P`` and two smooth random velocity steps (ss, rk4)."""
    from avsm.core.smoothing import MultiGaussianSmoother
    from avsm.models.vsvf import VelocityStep, low_res_shape

    base = identity_result(fixed, moving)
    fg, mg = base.fixed_grid, base.moving_grid
    H = mg.world_to_unit() @ P @ fg.unit_to_world()
    A, b = homogeneous_to_centred(torch.as_tensor(H)[None])
    low = low_res_shape(fg.shape)
    g = torch.Generator().manual_seed(seed)
    smooth = MultiGaussianSmoother(low, (0.3,), (1.0,))  # smooth on the images' own (coarse) grids
    steps = []
    for method in integrators:
        v = smooth(torch.randn(1, 3, *low, generator=g))
        v = v * (0.04 / v.abs().max())  # up to 4 % of the box per unit time: several voxels
        steps.append(VelocityStep(v=v.float(), method=method, steps=10, squarings=7))
    return RegistrationResult.from_steps(fixed_grid=fg, moving_grid=mg, fixed_original=fixed.grid,
                                         moving_original=moving.grid, A=A.float(), b=b.float(), steps=steps,
                                         method="steps")


@pytest.fixture(scope="module")
def compact_case(case: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("compact")
    res = steps_result(case["fixed"], case["moving"], case["P"])
    prefix = str(d / "c_")
    with OutputTransaction() as tx:
        files = write_transforms(res, prefix, tx)  # the default formats
    return {**case, "result": res, "files": files, "prefix": prefix}


def test_default_formats_are_what_ants_writes_plus_compact(compact_case: dict) -> None:
    assert set(compact_case["files"]) == {"affine", "warp", "inverse_warp", "compact"}
    assert os.path.getsize(compact_case["files"]["compact"]) < 200_000


def test_compact_round_trip_is_exact(compact_case: dict) -> None:
    from avsm.export.compact import load_compact

    res, fixed, moving = compact_case["result"], compact_case["fixed"], compact_case["moving"]
    back = load_compact(compact_case["files"]["compact"])
    assert [(s.method, s.steps, s.squarings) for s in back.steps] == [("ss", 10, 7), ("rk4", 10, 7)]
    fwd = float((back.world_map(fixed.grid) - res.world_map(fixed.grid)).abs().max())
    inv = float((back.world_map(moving.grid, inverse=True) - res.world_map(moving.grid, inverse=True)).abs().max())
    log.info("compact round trip: forward %.2e mm, inverse %.2e mm", fwd, inv)
    assert fwd <= 1e-4 and inv <= 1e-4
    # the maps are real deformations, not the affine alone
    assert float((res.world_map(fixed.grid) - res.world_map(fixed.grid, affine_only=True)).abs().max()) > 0.5
    # and the regenerated maps equal the ANTs files written at registration time
    tr = load_transform([compact_case["files"]["warp"], compact_case["files"]["affine"]])
    pts = grid_world_points(fixed.grid).reshape(3, -1)
    wm = back.world_map(fixed.grid)[0].numpy().reshape(3, -1)
    err = max(np.linalg.norm(np.array(tr.TransformPoint(tuple(pts[:, i]))) - wm[:, i])
              for i in range(0, pts.shape[1], 5))
    log.info("compact vs 1Warp+0GenericAffine at the fixed voxels: %.2e mm", err)
    assert err < 1e-3


def test_compact_on_another_grid_agrees_with_ants_field(compact_case: dict, tmp_path: Path) -> None:
    """On a finer, differently rotated grid inside the fixed box: regenerated exactly; the ANTs
    field read there by ITK agrees up to its trilinear interpolation error."""
    from avsm.cli.main import main
    from avsm.export.compact import load_compact

    res, fixed, moving = compact_case["result"], compact_case["fixed"], compact_case["moving"]
    ref = make_grid((11, 10, 8), (0.8, 0.7, 1.5), rotation(0.2, 0.1, 0.3), shift=(0.3, 0.2, -0.4))
    back = load_compact(compact_case["files"]["compact"])
    exact = float((back.world_map(ref) - res.world_map(ref)).abs().max())
    assert exact <= 1e-4
    tr = load_transform([compact_case["files"]["warp"], compact_case["files"]["affine"]])
    pts = grid_world_points(ref).reshape(3, -1)
    wm = back.world_map(ref)[0].numpy().reshape(3, -1)
    idx = apply_h(np.linalg.inv(fixed.grid.index_to_world()), pts)  # ITK reads 0 outside the field
    inside = np.all([(idx[c] >= 0) & (idx[c] <= n - 1) for c, n in enumerate(fixed.grid.itk_size)], axis=0)
    assert inside.sum() > 100
    err = max(np.linalg.norm(np.array(tr.TransformPoint(tuple(pts[:, i]))) - wm[:, i])
              for i in np.flatnonzero(inside))
    log.info("compact vs ANTs field on another grid: %.3e mm (exact regeneration %.1e mm)", err, exact)
    assert err < 0.05
    # avsm warp / avsm jacobian accept the compact file
    ref_path = str(tmp_path / "ref.nii.gz")
    sitk.WriteImage(Volume(np.zeros(ref.shape, np.float32), ref).to_sitk(), ref_path)
    out = tmp_path / "w.nii.gz"
    assert main(["warp", "-m", moving.path, "-r", ref_path, "-t", compact_case["files"]["compact"],
                 "-o", str(out)]) == 0
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.allclose(got, res.warp(moving, onto=ref).array, atol=1e-5)
    via_ants = sitk_warp(moving, ref, tr)
    mask = overlap(res, ref, moving.grid)
    assert rel_err(got, via_ants, mask, moving.array) < 1e-2
    out_inv = tmp_path / "wi.nii.gz"
    assert main(["warp", "-m", fixed.path, "-r", moving.path, "-t", compact_case["files"]["compact"],
                 "--inverse", "-o", str(out_inv)]) == 0
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out_inv))),
                       res.warp(fixed, inverse=True).array, atol=1e-5)
    jac = tmp_path / "jac.nii.gz"
    assert main(["jacobian", "--transform", compact_case["files"]["compact"], "--reference", ref_path,
                 "--out", str(jac)]) == 0
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(jac))), res.jacobian_determinant(ref),
                       rtol=1e-5, atol=1e-6)


def test_compact_bad_files(compact_case: dict, tmp_path: Path) -> None:
    from avsm.cli.main import main
    from avsm.export.compact import load_compact

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    for path, why in ((garbage, "not an avsm transform file"), (other, "not an avsm transform file"),
                      (tmp_path / "missing.npz", "not found")):
        with pytest.raises(AvsmError, match=why) as e:
            load_compact(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "w.nii.gz"
    assert main(["warp", "-m", compact_case["moving"].path, "-r", compact_case["fixed"].path, "-t",
                 compact_case["files"]["compact"], compact_case["files"]["affine"], "-o", str(out)]) != 0
    assert not out.exists()


def test_slabs_equal_the_whole_grid(compact_case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warps, det J and fields computed slab by slab equal the whole-grid computation."""
    import avsm.transform as T
    from avsm.export.itk import field_slab
    from avsm.transform import world_jacobian_determinant

    res, fixed, moving = compact_case["result"], compact_case["fixed"], compact_case["moving"]
    whole_det = world_jacobian_determinant(res.world_map(fixed.grid), fixed.grid)
    whole_warp = res.warp(moving).array
    labels = Volume((moving.array > np.median(moving.array)).astype(np.int16) * 3, moving.grid, is_label=True)
    whole_lab = res.warp(labels).array
    whole_field = field_slab(res, "inverse_warp", fixed.grid)
    plane = fixed.grid.shape[1] * fixed.grid.shape[2]
    monkeypatch.setattr(T, "SLAB_VOXELS", 2 * plane)  # slabs of 2 slices
    assert len(T.slab_ranges(fixed.grid)) == (fixed.grid.shape[0] + 1) // 2
    assert np.allclose(res.jacobian_determinant(), whole_det, rtol=1e-6, atol=1e-7)
    assert np.allclose(res.warp(moving).array, whole_warp, atol=1e-5)  # float32 sampling coordinates
    assert np.array_equal(res.warp(labels).array, whole_lab)
    parts = [field_slab(res, "inverse_warp", fixed.grid.slab(a, b)) for a, b in T.slab_ranges(fixed.grid)]
    # (the fixed-point inversion outside the moving box stops at 1e-6 mm per slab)
    assert np.allclose(np.concatenate(parts, axis=1), whole_field, atol=1e-5)
