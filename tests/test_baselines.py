"""Each baseline's transform, converted to avsm's convention, reproduces the tool's own warped output."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from avsm.baselines.base import FieldResult, get_method, run_method
from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image

DATA = os.path.join(os.path.dirname(__file__), "data")
HAS_ANTS = importlib.util.find_spec("ants") is not None


@pytest.fixture(scope="module")
def pair() -> tuple[Volume, Volume]:
    return load_image(os.path.join(DATA, "mni_4mm.nii.gz")), load_image(os.path.join(DATA, "colin_4mm.nii.gz"))


def _inside(vol: Volume) -> np.ndarray:
    """Voxels at least 2 from the border (the tools and avsm differ only in out-of-FOV handling)."""
    m = np.zeros(vol.array.shape, bool)
    m[2:-2, 2:-2, 2:-2] = True
    return m


def _check_matches(ours: np.ndarray, tool: np.ndarray, unwarped: np.ndarray, mask: np.ndarray) -> None:
    err = np.abs(ours - tool)[mask]
    base = np.abs(unwarped - tool)[mask]
    assert err.mean() < 2e-3, err.mean()
    assert np.percentile(err, 99.9) < 2e-2
    # the check has teeth: without the transform the images differ a lot more
    assert base.mean() > 20 * max(err.mean(), 1e-6)


@pytest.mark.skipif(not HAS_ANTS, reason="antspyx not installed (pip install 'avsm[baselines]')")
def test_ants_syn_world_maps_match_ants_output(pair: tuple[Volume, Volume]) -> None:
    fixed, moving = pair
    res = run_method("ants-syn", fixed, moving, spacing=4.0, keep_warped=True, reg_iterations=(20, 10, 0))
    assert isinstance(res, FieldResult)
    tool = res.info["ants_warped"]
    mw, fw = res.info["moving_work"], res.info["fixed_work"]
    ours = res.warp(mw, onto=tool.grid)
    ident = Volume(mw.array, mw.grid)  # moving resampled by the physical identity
    from avsm.io.image import resample

    unwarped = resample(ident, tool.grid).array
    _check_matches(ours.array, tool.array, unwarped, _inside(tool))
    # inverse: fixed warped into the moving space
    tool_inv = res.info["ants_warped_fixed"]
    ours_inv = res.warp(fw, onto=tool_inv.grid, inverse=True)
    _check_matches(ours_inv.array, tool_inv.array, resample(fw, tool_inv.grid).array, _inside(tool_inv))
    assert res.affine_forward is not None
    assert res.timings["wall"] > 0


@pytest.mark.skipif(not HAS_ANTS, reason="antspyx not installed (pip install 'avsm[baselines]')")
def test_ants_syncc_is_registered() -> None:
    assert callable(get_method("ants-syncc"))


def test_demons_world_map_matches_sitk_output(pair: tuple[Volume, Volume]) -> None:
    fixed, moving = pair
    res = run_method("demons", fixed, moving, spacing=4.0, keep_warped=True, iterations=(10, 10), shrink=(2, 1))
    _check_tool_output(res, key="sitk_warped")
    # the affine stage alone is exact and invertible
    wm = res.world_map(affine_only=True)
    back = res.world_map(affine_only=True, inverse=True, grid=moving.grid)
    assert wm.shape == (1, 3, *fixed.grid.shape) and back.shape == (1, 3, *moving.grid.shape)


def test_sitk_affine_and_unknown_method(pair: tuple[Volume, Volume]) -> None:
    fixed, moving = pair
    res = run_method("sitk-affine", fixed, moving, spacing=4.0)
    det = res.jacobian_determinant()
    assert np.allclose(det, det.flat[0]) and det.flat[0] > 0
    with pytest.raises(KeyError):
        get_method("no-such-method")


HAS_ELASTIX = shutil.which("elastix") is not None and shutil.which("transformix") is not None


def _has_niftyreg() -> bool:
    from avsm.baselines.base import MethodUnavailable
    from avsm.baselines.niftyreg import niftyreg_binary

    try:
        for name in ("reg_aladin", "reg_f3d", "reg_transform"):
            niftyreg_binary(name)
    except MethodUnavailable:
        return False
    return True


def _check_tool_output(res: FieldResult, key: str = "tool_warped") -> None:
    """The converted map reproduces the tool's own warped image ``res.info[key]``; no inverse is given."""
    from avsm.io.image import resample

    tool = res.info[key]
    mw = res.info["moving_work"]
    ours = res.warp(mw, onto=tool.grid)
    _check_matches(ours.array, tool.array, resample(mw, tool.grid).array, _inside(tool))
    with pytest.raises(NotImplementedError):
        res.world_map(inverse=True)
    # the recorded affine stage is a proper (orientation-preserving) affine
    assert res.affine_forward is not None and np.linalg.det(res.affine_forward[:3, :3]) > 0


@pytest.mark.skipif(not HAS_ELASTIX, reason="elastix/transformix CLI not on PATH (apt-get install elastix)")
def test_elastix_world_map_matches_elastix_output(pair: tuple[Volume, Volume]) -> None:
    fixed, moving = pair
    res = run_method("elastix", fixed, moving, spacing=4.0, keep_warped=True, grid_spacing_mm=16.0,
                     affine_iterations=64, bspline_iterations=64)
    _check_tool_output(res)


def test_elastix_affine_parameter_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from avsm.baselines.elastix import read_affine_parameters

    A = np.array([[1.1, 0.05, 0.0], [-0.02, 0.95, 0.1], [0.0, 0.03, 1.02]])
    t, c = np.array([3.0, -2.0, 5.0]), np.array([10.0, 20.0, -30.0])
    p = tmp_path / "TransformParameters.0.txt"
    p.write_text('(Transform "AffineTransform")\n(NumberOfParameters 12)\n'
                 f"(TransformParameters {' '.join(map(str, [*A.ravel(), *t]))})\n"
                 f"(CenterOfRotationPoint {' '.join(map(str, c))})\n")
    M = read_affine_parameters(p)
    x = np.array([7.0, -4.0, 12.0])
    np.testing.assert_allclose(M[:3, :3] @ x + M[:3, 3], A @ (x - c) + t + c, atol=1e-12)


@pytest.mark.skipif(not _has_niftyreg(), reason="NiftyReg not installed "
                    "(CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install niftyreg)")
def test_niftyreg_world_map_matches_niftyreg_output(pair: tuple[Volume, Volume]) -> None:
    fixed, moving = pair
    res = run_method("niftyreg", fixed, moving, spacing=4.0, keep_warped=True, max_iterations=30, levels=2)
    _check_tool_output(res)


HAS_VXM = importlib.util.find_spec("voxelmorph") is not None


@pytest.mark.skipif(not HAS_VXM, reason="voxelmorph not installed (pip install voxelmorph)")
def test_voxelmorph_displacement_conversion_matches_its_spatial_transformer(pair: tuple[Volume, Volume],
                                                                           tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from avsm.baselines.voxelmorph import build_network
    from avsm.io.image import resample

    torch.manual_seed(0)
    net = build_network()
    with torch.no_grad():  # a random but clearly non-zero displacement
        for p in net.parameters():
            if p.dim() == 5 and p.shape[0] == 3:
                p.normal_(0.0, 0.5)
    path = tmp_path / "vxm.pt"
    torch.save({"config": {"nb_features": [16, 32, 32, 32], "integration_steps": 5}, "state_dict": net.state_dict()},
               path)
    fixed, moving = pair
    res = run_method("voxelmorph", fixed, moving, weights=str(path), spacing=4.0, keep_warped=True)
    tool, m_aff = res.info["tool_warped"], res.info["moving_affine"]
    disp_mm = np.linalg.norm(res.forward.field, axis=0)
    assert disp_mm.max() > 2.0  # the check below has something to check
    # the network's own warp of its (affinely resampled) input = our world map's field applied to that input
    field_only = FieldResult(tool.grid, tool.grid, type(res.forward)(field_grid=res.forward.field_grid,
                                                                      field=res.forward.field))
    ours = field_only.warp(m_aff, onto=tool.grid)
    _check_matches(ours.array, tool.array, resample(m_aff, tool.grid).array, _inside(tool))


def test_tagged_method_name_is_the_same_method() -> None:
    from avsm.baselines.base import get_method

    assert get_method("net@old") is get_method("net")
    assert get_method("opt@x") is get_method("opt")
    with pytest.raises(KeyError):
        get_method("nosuch@x")


# --------------------------------------------------------------------------- strongest peers
# ants-syn-cc (antsRegistrationSyN[s]), ants-syn-quick (antsRegistrationSyNQuick[s]), fireants.
# Each runs once on a tiny synthetic pair (a 32³ crop of the 4 mm MNI brain and the same brain
# under a known affine) and is checked twice: it recovers the known map far better than the
# identity, and its transform as ANTs applies it equals avsm's world map of it.

HAS_FIREANTS = importlib.util.find_spec("fireants") is not None
FIREANTS_REASON = ('fireants not installed (pip install --no-deps fireants hydra-core "omegaconf>=2.2,<2.4" '
                   "antlr4-python3-runtime==4.9.3)")


def _known_affine(center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4, 4) world matrix of the true pull-back map (fixed → moving) and its ``sitk`` inverse transform."""
    import SimpleITK as sitk

    a = np.deg2rad(6.0)
    R = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    A = R @ np.diag([1.04, 0.97, 1.0])
    t = np.array([4.0, -3.0, 2.0])
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = A, center - A @ center + t
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(A.ravel().tolist())
    tx.SetCenter(center.tolist())
    tx.SetTranslation(t.tolist())
    return M, tx.GetInverse()


AffinePair = tuple[Volume, Volume, np.ndarray]


@pytest.fixture(scope="module")
def affine_pair() -> AffinePair:
    """``(fixed, moving, true_map)``: moving(φ(x)) = fixed(x) with φ = ``true_map`` (world, mm)."""
    import SimpleITK as sitk

    src = load_image(os.path.join(DATA, "mni_4mm.nii.gz")).to_sitk()
    size = np.array(src.GetSize())
    lo = (size - 32) // 2
    crop = src[int(lo[0]):int(lo[0]) + 32, int(lo[1]):int(lo[1]) + 32, int(lo[2]):int(lo[2]) + 32]
    center = np.array(crop.TransformContinuousIndexToPhysicalPoint([15.5, 15.5, 15.5]))
    true_map, inv = _known_affine(center)
    moved = sitk.Resample(src, crop, inv, sitk.sitkLinear, 0.0)  # moved(y) = src(φ⁻¹(y))
    return Volume.from_sitk(crop), Volume.from_sitk(moved), true_map


def _check_recovers(res: FieldResult, fixed: Volume, true_map: np.ndarray) -> tuple[float, float]:
    """Mean world-map error (mm) inside the brain, 4 voxels from the border, and the identity's."""
    from avsm.transform import apply_homogeneous, grid_world_points

    pts = grid_world_points(fixed.grid)
    truth = apply_homogeneous(true_map, pts)[0].numpy()
    ours = res.world_map(fixed.grid)[0].numpy()
    mask = np.zeros(fixed.array.shape, bool)
    mask[4:-4, 4:-4, 4:-4] = True
    mask &= fixed.array > np.percentile(fixed.array, 40)
    err = np.linalg.norm(ours - truth, axis=0)[mask].mean()
    ident = np.linalg.norm(pts[0].numpy() - truth, axis=0)[mask].mean()
    assert ident > 4.0  # the known map is not small against the voxel (4 mm)
    assert err < 0.4 * ident, (err, ident)
    return float(err), float(ident)


def _maps_inside(res: FieldResult, grid: Grid, target: Grid, *, inverse: bool = False) -> np.ndarray:
    """Voxels of ``grid`` 2 from its border whose mapped point lies 1 voxel inside ``target``.

    On a crop the known map carries points out of the other image; there the tools and avsm
    differ only in how they pad, so those voxels are left out of the comparison.
    """
    from avsm.transform import apply_homogeneous

    wm = res.world_map(grid, inverse=inverse)
    idx = apply_homogeneous(np.linalg.inv(target.index_to_world()), wm)[0].numpy()  # ITK (x, y, z) order
    size = np.asarray(target.itk_size, float).reshape(3, 1, 1, 1)
    mask = ((idx >= 1.0) & (idx <= size - 2.0)).all(axis=0)
    return mask & _inside(Volume(np.zeros(grid.shape, np.float32), grid))


def _check_ants_output(res: FieldResult) -> None:
    """ANTs' own warped images (forward and inverse) = avsm's world maps applied (as the ants-syn test)."""
    from avsm.io.image import resample

    tool = res.info["ants_warped"]
    mw, fw = res.info["moving_work"], res.info["fixed_work"]
    ours = res.warp(mw, onto=tool.grid)
    _check_matches(ours.array, tool.array, resample(mw, tool.grid).array, _maps_inside(res, tool.grid, mw.grid))
    tool_inv = res.info["ants_warped_fixed"]
    ours_inv = res.warp(fw, onto=tool_inv.grid, inverse=True)
    _check_matches(ours_inv.array, tool_inv.array, resample(fw, tool_inv.grid).array,
                   _maps_inside(res, tool_inv.grid, fw.grid, inverse=True))
    assert res.affine_forward is not None and np.linalg.det(res.affine_forward[:3, :3]) > 0
    assert res.timings["registration"] > 0 and res.timings["wall"] >= res.timings["registration"]


@pytest.mark.skipif(not HAS_ANTS, reason="antspyx not installed (pip install 'avsm[baselines]')")
def test_ants_syn_quick_recovers_known_affine_and_matches_ants(affine_pair: AffinePair) -> None:
    fixed, moving, true_map = affine_pair
    # the exact documented call: antsRegistrationSyNQuick[s] with antspyx's own schedule
    res = run_method("ants-syn-quick", fixed, moving, spacing=4.0, keep_warped=True)
    assert res.method == "ants-syn-quick" and res.info["type_of_transform"] == "antsRegistrationSyNQuick[s]"
    assert res.info["convergence"] is None
    _check_recovers(res, fixed, true_map)
    _check_ants_output(res)


@pytest.mark.skipif(not HAS_ANTS, reason="antspyx not installed (pip install 'avsm[baselines]')")
def test_ants_syn_cc_recovers_known_affine_and_matches_ants(affine_pair: AffinePair) -> None:
    fixed, moving, true_map = affine_pair
    # antsRegistrationSyN[s] (rigid, affine, SyN CC radius 2), fewer iterations per level for the test
    short = ("[100x50x25x10,1e-6,10]", "[100x50x25x10,1e-6,10]", "[10x5x3x2,1e-6,10]")
    res = run_method("ants-syn-cc", fixed, moving, spacing=4.0, keep_warped=True, convergence=short)
    assert res.method == "ants-syn-cc" and res.info["type_of_transform"] == "antsRegistrationSyN[s]"
    _check_recovers(res, fixed, true_map)
    _check_ants_output(res)
    with pytest.raises(ValueError, match="2 values for 3 stages"):
        run_method("ants-syn-cc", fixed, moving, spacing=4.0, convergence=short[:2])


@pytest.mark.skipif(not HAS_FIREANTS, reason=FIREANTS_REASON)
def test_fireants_recovers_known_affine_and_ants_applies_it_as_avsm(affine_pair: AffinePair, tmp_path: Path) -> None:
    from avsm.io.image import resample

    fixed, moving, true_map = affine_pair
    # the LPBA40 script's stages with fewer iterations; one torch thread (OpenMP threads spin on a busy CPU)
    res = run_method("fireants", fixed, moving, spacing=4.0, keep_warped=True, transform_dir=str(tmp_path),
                     iterations=(20, 10, 3), affine_iterations=(10, 5, 0, 0), threads=1, inverse=True)
    assert res.method == "fireants" and res.info["deformable_opts"]["iterations"] == [20, 10, 3]
    assert res.info["torch_threads"] == 1
    _, ident = _check_recovers(res, fixed, true_map)
    # its inverse (FireANTs' own inversion, on the moving grid) undoes the forward map
    from avsm.transform import grid_world_points

    back = res.inverse(res.world_map(fixed.grid))
    trip = (back - grid_world_points(fixed.grid)).norm(dim=1)[0].numpy()
    assert trip[_maps_inside(res, fixed.grid, res.inverse.field_grid)].mean() < 0.25 * ident
    # FireANTs' own warped moving image = avsm's world map applied
    tool, mw, fw = res.info["tool_warped"], res.info["moving_work"], res.info["fixed_work"]
    ours = res.warp(mw, onto=tool.grid)
    _check_matches(ours.array, tool.array, resample(mw, tool.grid).array, _maps_inside(res, tool.grid, mw.grid))
    assert res.affine_forward is not None and np.linalg.det(res.affine_forward[:3, :3]) > 0
    t = res.timings
    assert t["registration"] == pytest.approx(t["moments"] + t["affine"] + t["deformable"])
    assert t["wall"] >= t["registration"] > 0
    if HAS_ANTS:  # the ANTs displacement field it wrote, applied by antsApplyTransforms
        from avsm.baselines.ants import import_ants, to_ants

        ants = import_ants()
        warped = ants.apply_transforms(fixed=to_ants(fw), moving=to_ants(mw),
                                       transformlist=[res.info["ants_transforms"]["forward"]])
        by_ants = np.ascontiguousarray(warped.numpy().transpose(2, 1, 0))
        _check_matches(res.warp(mw, onto=fw.grid).array, by_ants, resample(mw, fw.grid).array,
                       _maps_inside(res, fw.grid, mw.grid))


def test_new_peers_are_registered_and_unavailable_tools_say_why(monkeypatch: pytest.MonkeyPatch,
                                                                 pair: tuple[Volume, Volume]) -> None:
    import sys

    from avsm.baselines.base import REGISTRY, MethodUnavailable

    for name in ("ants-syn-cc", "ants-syn-quick", "fireants"):
        assert name in REGISTRY and callable(get_method(name))
    fixed, moving = pair
    for mod in [m for m in sys.modules if m == "fireants" or m.startswith("fireants.")] + ["fireants"]:
        monkeypatch.setitem(sys.modules, mod, None)  # as if not installed
    with pytest.raises(MethodUnavailable, match="pip install --no-deps fireants"):
        run_method("fireants", fixed, moving, spacing=4.0)
    monkeypatch.setitem(sys.modules, "ants", None)
    with pytest.raises(MethodUnavailable, match="antspyx is not installed"):
        run_method("ants-syn-cc", fixed, moving, spacing=4.0)
