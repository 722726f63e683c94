"""Each baseline's transform, converted to avsm's convention, reproduces the tool's own warped output."""

from __future__ import annotations

import importlib.util
import os

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
    from avsm.io.image import resample

    fixed, moving = pair
    res = run_method("demons", fixed, moving, spacing=4.0, keep_warped=True, iterations=(10, 10), shrink=(2, 1))
    tool = res.info["sitk_warped"]
    mw = res.info["moving_work"]
    ours = res.warp(mw, onto=tool.grid)
    _check_matches(ours.array, tool.array, resample(mw, tool.grid).array, _inside(tool))
    with pytest.raises(NotImplementedError):
        res.world_map(inverse=True)
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
