"""Known-answer tests of the evaluation metrics (Dice, HD95, folds, SDlogJ, inverse consistency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from avsm.api import identity_result
from avsm.baselines.base import FieldResult, WorldTransform, grid_world_points
from avsm.io.geometry import Grid
from avsm.io.image import Volume
from avsm.metrics import (
    array_spacing,
    dice_per_label,
    fold_stats,
    hd95,
    hd95_per_label,
    inverse_consistency,
    inverse_consistency_error,
    mean_dice,
    sd_log_jacobian,
    world_jacobian_determinant,
)
from avsm.metrics.distance import surface

EYE9 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _grid(shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=EYE9) -> Grid:
    return Grid(shape=shape, spacing=spacing, origin=origin, direction=direction)


def _brute_hd95(p: np.ndarray, t: np.ndarray, spacing) -> float:
    sp = np.argwhere(surface(p)) * np.asarray(spacing)
    st = np.argwhere(surface(t)) * np.asarray(spacing)
    d = cdist(sp, st)
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


# --------------------------------------------------------------------------- Dice / HD95


def test_dice_known_cubes() -> None:
    truth = np.zeros((10, 10, 10), np.int32)
    pred = np.zeros_like(truth)
    truth[2:6, 2:6, 2:6] = 1
    pred[3:7, 2:6, 2:6] = 1  # overlap 3*4*4 = 48 of 64 + 64
    truth[7:9, 7:9, 7:9] = 2
    pred[7:9, 7:9, 7:9] = 5  # label 2 of truth <-> 5 of pred
    d = dice_per_label(pred, truth, labels=[1, 2], mapping={1: 1, 2: 5})
    assert d[1] == pytest.approx(0.75)
    assert d[2] == pytest.approx(1.0)
    assert mean_dice(d) == pytest.approx(0.875)


def test_hd95_single_voxels_anisotropic() -> None:
    a = np.zeros((9, 9, 12), bool)
    b = np.zeros_like(a)
    a[5, 5, 5] = True
    b[5, 5, 8] = True
    assert hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    assert hd95(a, b, (3.0, 3.0, 0.5)) == pytest.approx(1.5)


def test_hd95_identical_and_empty() -> None:
    a = np.zeros((8, 8, 8), bool)
    a[2:6, 3:5, 1:7] = True
    assert hd95(a, a, (1.0, 2.0, 3.0)) == 0.0
    assert math.isnan(hd95(a, np.zeros_like(a)))
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_hd95_shifted_cube_matches_brute_force() -> None:
    t = np.zeros((16, 16, 16), bool)
    p = np.zeros_like(t)
    t[3:11, 4:12, 4:12] = True
    p[5:13, 4:12, 4:12] = True  # shifted 2 voxels along axis 0
    sp = (1.5, 1.0, 0.7)
    assert hd95(p, t, sp) == pytest.approx(_brute_hd95(p, t, sp))
    # the largest surface distance is the 2-voxel shift of the end faces: 2 * 1.5 mm
    assert hd95(p, t, sp) <= 3.0 + 1e-9


def test_hd95_spheres_brute_force_and_per_label() -> None:
    z, y, x = np.mgrid[:20, :20, :20]
    t = (z - 10) ** 2 + (y - 9) ** 2 + (x - 10) ** 2 <= 36
    p = (z - 11) ** 2 + (y - 10) ** 2 + (x - 9) ** 2 <= 25
    sp = (1.2, 0.8, 1.0)
    ref = _brute_hd95(p, t, sp)
    assert hd95(p, t, sp) == pytest.approx(ref)
    lab_t = t.astype(np.int32) * 3
    lab_p = p.astype(np.int32) * 7
    assert hd95_per_label(lab_p, lab_t, sp, mapping={3: 7})[3] == pytest.approx(ref)


def test_array_spacing_is_reversed_itk_order() -> None:
    g = _grid((4, 5, 6), spacing=(1.0, 2.0, 3.0))
    assert array_spacing(g) == (3.0, 2.0, 1.0)


# --------------------------------------------------------------------------- folds / SDlogJ


def test_folds_hand_built_map_known_count() -> None:
    g = _grid((10, 6, 7), spacing=(1.0, 1.0, 2.0))
    wm = grid_world_points(g)
    # world z runs along tensor axis 0 with 2 mm steps; fold the profile once
    prof = torch.tensor([0, 1, 2, 3, 4, 3.5, 3, 6, 7, 8], dtype=torch.float64) * 2.0
    wm[0, 2] = prof.view(10, 1, 1).expand(10, 6, 7)
    det = world_jacobian_determinant(wm, g)
    fs = fold_stats(det)
    # central differences: only slab i = 5 has (3 - 4) / 2 < 0
    assert fs.count == 6 * 7
    assert fs.fraction == pytest.approx(42 / 420)
    assert det[4, 0, 0] == pytest.approx(0.25)
    assert fold_stats(det, mask=np.zeros_like(det, dtype=bool)).count == 0


def test_affine_has_no_folds_and_zero_sdlogj() -> None:
    g = _grid((12, 10, 11), spacing=(1.0, 1.5, 2.0), origin=(3.0, -4.0, 7.0))
    th = 0.3
    A = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]]) @ np.diag([1.1, 0.9, 1.05])
    M = np.eye(4)
    M[:3, :3] = A
    M[:3, 3] = [2.0, -1.0, 5.0]
    res = FieldResult(g, g, WorldTransform(affine=M))
    det = res.jacobian_determinant()
    assert np.allclose(det, np.linalg.det(A))
    assert fold_stats(det).count == 0
    assert sd_log_jacobian(det) < 1e-10
    # a reflection folds everywhere
    R = M.copy()
    R[0, :3] *= -1
    assert fold_stats(FieldResult(g, g, WorldTransform(affine=R)).jacobian_determinant()).count == g.num_voxels


def test_sdlogj_values_and_clipping() -> None:
    assert sd_log_jacobian(np.array([1.0, math.e])) == pytest.approx(0.5)
    v = sd_log_jacobian(np.array([1.0, -1.0]), clip=1e-9)
    assert v == pytest.approx(0.5 * -math.log(1e-9))


# --------------------------------------------------------------------------- inverse consistency


def _affine(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    M = np.eye(4)
    M[:3, :3] = np.eye(3) + 0.05 * rng.normal(size=(3, 3))
    M[:3, 3] = rng.normal(size=3) * 3
    return M


def test_inverse_consistency_exact_pair_is_very_low() -> None:
    ga = _grid((30, 28, 26), spacing=(1.0, 1.2, 1.5), origin=(-10.0, 5.0, 0.0))
    gb = _grid((32, 30, 24), spacing=(1.1, 1.0, 1.6), origin=(-12.0, 3.0, 2.0))
    M = _affine(0)
    fwd = FieldResult(ga, gb, WorldTransform(affine=M))
    bwd = FieldResult(gb, ga, WorldTransform(affine=np.linalg.inv(M)))
    assert inverse_consistency(fwd, bwd, border=5) < -20
    # mismatched by a 2 mm translation: the round trip is off by 2 mm everywhere -> ln(4)
    S = np.eye(4)
    S[:3, 3] = [2.0, 0.0, 0.0]
    bad = FieldResult(gb, ga, WorldTransform(affine=S @ np.linalg.inv(M)))
    assert inverse_consistency_error(fwd, bad, border=5) == pytest.approx(4.0, rel=1e-6)
    assert inverse_consistency(fwd, bad, border=5) == pytest.approx(math.log(4.0), rel=1e-6)


def test_inverse_consistency_registration_results() -> None:
    """Two avsm RegistrationResults that are exact inverses (physical identity both ways)."""
    ga = _grid((40, 36, 34), spacing=(2.0, 2.0, 2.0), origin=(-40.0, -30.0, -20.0))
    gb = Grid((38, 40, 30), (2.2, 1.9, 2.1), (-35.0, 40.0, -25.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    va = Volume(np.random.default_rng(0).random(ga.shape, dtype=np.float32), ga)
    vb = Volume(np.random.default_rng(1).random(gb.shape, dtype=np.float32), gb)
    fwd = identity_result(va, vb)
    bwd = identity_result(vb, va)
    assert inverse_consistency(fwd, bwd, border=10) < -10
    S = np.eye(4)
    S[:3, 3] = [0.0, 3.0, 0.0]
    bad = FieldResult(gb, ga, WorldTransform(affine=S))
    assert inverse_consistency(fwd, bad, border=10) == pytest.approx(math.log(9.0), abs=1e-3)
