"""Each baseline's transform, converted to avsm's convention, reproduces the tool's own warped output."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

from avsm.baselines.base import FieldResult, get_method, run_method
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
