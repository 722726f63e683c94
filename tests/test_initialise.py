"""Initialisation independent of where the scanner put the image (avsm.optim.initialise).

Every case is built from the real Colin27 brain (4 mm) with a *known* world
relation between the fixed and the moving image; errors are mean distances
(mm) between the returned and the true fixed-world → moving-world pull-back
over the fixed image's brain voxels.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from avsm.api import prepare_pair, to_working, working_grid_for
from avsm.core.coords import homogeneous_to_centred, identity_map
from avsm.io.geometry import Grid, unit_affine_between
from avsm.io.image import Volume, load_image
from avsm.optim.initialise import INIT_MODES, InitResult, image_moments, initial_affine

DATA = Path(__file__).parent / "data"
SPACING = 4.0  # working grids at the fixture's own resolution keep the tests fast


# --------------------------------------------------------------------------- fixtures


@lru_cache(maxsize=None)
def _colin() -> Volume:
    return load_image(str(DATA / "colin_4mm.nii.gz"))


@lru_cache(maxsize=None)
def _mni() -> Volume:
    return load_image(str(DATA / "mni_4mm.nii.gz"))


def _working(volume: Volume, spacing: float = SPACING) -> tuple[Grid, torch.Tensor]:
    """Working grid and ``(1, 1, D, H, W)`` tensor, as :func:`avsm.api.prepare_pair` builds them."""
    grid = working_grid_for(volume.grid, spacing=spacing)
    return grid, torch.from_numpy(to_working(volume, grid))[None, None]


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def _centre(volume: Volume) -> np.ndarray:
    """World position (mm) of the centre of the image box."""
    corners = volume.grid.world_corners()
    return 0.5 * (corners.min(0) + corners.max(0))


def _with_header(volume: Volume, R: np.ndarray, t: np.ndarray) -> tuple[Volume, np.ndarray]:
    """Same voxels, header rotated by ``R`` about the box centre and moved by ``t`` (mm).

    Returns the moving volume and the true pull-back ``W`` (fixed world → moving world).
    """
    g = volume.grid
    o = np.asarray(g.origin)
    c = _centre(volume)
    o2 = R @ (o - c) + c + t
    grid = Grid(g.shape, g.spacing, tuple(o2), tuple((R @ g.direction_matrix).reshape(-1)))
    W = np.eye(4)
    W[:3, :3] = R
    W[:3, 3] = o2 - R @ o
    return Volume(volume.array.copy(), grid), W


def _flipped(volume: Volume, itk_axes: tuple[int, ...], swap_xy: bool = False) -> Volume:
    """The same physical image stored with ITK axes flipped (and x, y swapped).

    Header and voxels change together, so the world relation stays the identity."""
    g = volume.grid
    a = volume.array
    D = g.direction_matrix.copy()
    o = np.asarray(g.origin, dtype=np.float64)
    for k in itk_axes:
        o = o + D[:, k] * g.spacing[k] * (g.itk_size[k] - 1)
        D[:, k] = -D[:, k]
        a = np.flip(a, axis=2 - k)
    spacing = list(g.spacing)
    if swap_xy:
        a = np.swapaxes(a, 1, 2)
        D = D[:, [1, 0, 2]]
        spacing = [spacing[1], spacing[0], spacing[2]]
    a = np.ascontiguousarray(a)
    return Volume(a, Grid(a.shape, tuple(spacing), tuple(o), tuple(D.reshape(-1))))


def _physically_moved(volume: Volume, R: np.ndarray, t: np.ndarray, spacing: tuple[float, float, float],
                      header_shift: np.ndarray) -> tuple[Volume, np.ndarray]:
    """The brain rotated by ``R`` about the box centre and moved by ``t`` (mm), resampled
    (linear) onto a padded grid of anisotropic ``spacing``; then its origin alone moved
    by ``header_shift``.  Returns the volume and the true pull-back ``W``."""
    src = volume.to_sitk()
    c = _centre(volume)
    # moving(y) = fixed(T(y)) with T(y) = Rᵀ (y − c − t) + c, so W(x) = T⁻¹(x) = R (x − c) + c + t
    T = sitk.AffineTransform(3)
    T.SetMatrix(R.T.reshape(-1).tolist())
    T.SetCenter(c.tolist())
    T.SetTranslation((-(R.T @ t)).tolist())
    pad = 40.0
    lo = volume.grid.world_corners().min(0) - pad + t
    ext = volume.grid.world_corners().max(0) - volume.grid.world_corners().min(0) + 2 * pad
    ref = sitk.Image([int(np.ceil(e / s)) + 1 for e, s in zip(ext, spacing)], sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(lo.tolist())
    out = sitk.Resample(src, ref, T, sitk.sitkLinear, 0.0)
    out.SetOrigin((np.asarray(out.GetOrigin()) + header_shift).tolist())
    W = np.eye(4)
    W[:3, :3] = R
    W[:3, 3] = c + t - R @ c + header_shift
    return Volume.from_sitk(out), W


@lru_cache(maxsize=None)
def _fixed() -> tuple[Grid, torch.Tensor, np.ndarray]:
    """Fixed working grid, tensor and the world points (3, N) of its brain voxels."""
    grid, t = _working(_colin())
    u = identity_map(grid.shape, dtype=torch.float64)[0].reshape(3, -1).numpy()
    brain = t[0, 0].numpy().reshape(-1) > 0.1
    M = grid.unit_to_world()
    return grid, t, M[:3, :3] @ u[:, brain] + M[:3, 3:4]


def _error_mm(W: np.ndarray, W_true: np.ndarray) -> float:
    """Mean distance (mm) between two pull-backs over the fixed brain voxels."""
    X = _fixed()[2]
    d = (W[:3, :3] - W_true[:3, :3]) @ X + (W[:3, 3] - W_true[:3, 3])[:, None]
    return float(np.linalg.norm(d, axis=0).mean())


def _run(moving: Volume, mode: str = "auto", **kw: object) -> tuple[InitResult, Grid]:
    fg, ft, _ = _fixed()
    mg, mt = _working(moving, kw.pop("spacing", SPACING))  # type: ignore[arg-type]
    res = initial_affine(ft, mt, fg.unit_to_world(), mg.unit_to_world(), mode, **kw)  # type: ignore[arg-type]
    assert res.A0.shape == (1, 3, 3) and res.b0.shape == (1, 3)
    assert res.A0.dtype == torch.float32 and res.b0.dtype == torch.float32
    assert res.world.shape == (4, 4)
    assert np.linalg.det(res.world[:3, :3]) > 0, "never a mirroring initialisation"
    # A0, b0 are always the unit form of the returned world pull-back
    M = mg.world_to_unit() @ res.world @ fg.unit_to_world()
    A, b = homogeneous_to_centred(torch.as_tensor(M).unsqueeze(0))
    torch.testing.assert_close(res.A0, A.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.b0, b.float(), atol=1e-6, rtol=0)
    return res, mg


def _header_affine(fg: Grid, mg: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    M = torch.as_tensor(unit_affine_between(fg, mg), dtype=torch.float64).unsqueeze(0)
    A, b = homogeneous_to_centred(M)
    return A.float(), b.float()


# --------------------------------------------------------------------------- 1. translation


@pytest.mark.parametrize("moving_spacing", [SPACING, 5.0])
def test_header_translation_of_300mm_is_recovered(moving_spacing):
    """Origin moved by (300, -200, 100) mm, voxels untouched (moving grid also at 5 mm)."""
    t = np.array([300.0, -200.0, 100.0])
    moving, W_true = _with_header(_colin(), np.eye(3), t)
    assert _error_mm(np.eye(4), W_true) > 300  # the header alone is far off
    for mode in ("auto", "com"):
        res, _ = _run(moving, mode, spacing=moving_spacing)
        err = _error_mm(res.world, W_true)
        assert err < 2.0, (mode, res.chosen, err)  # measured ≈ 0.0-0.1 mm
        assert res.chosen != "header"
    res, mg = _run(moving, "auto", spacing=moving_spacing)
    assert res.scores["header"] == float("inf")  # no overlap: it must lose
    assert res.overlap["header"] == 0.0
    # header mode is today's behaviour, exactly
    hdr, mg = _run(moving, "header", spacing=moving_spacing)
    A_ref, b_ref = _header_affine(_fixed()[0], mg)
    assert hdr.chosen == "header" and np.array_equal(hdr.world, np.eye(4))
    assert torch.equal(hdr.A0, A_ref) and torch.equal(hdr.b0, b_ref)


# --------------------------------------------------------------------------- 2. rotations


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_header_rotation_of_30_degrees_is_recovered(axis):
    """Direction matrix rotated 30° about world axis ``axis`` plus a (20, -30, 40) mm offset."""
    moving, W_true = _with_header(_colin(), _rotation(axis, 30.0), np.array([20.0, -30.0, 40.0]))
    assert _error_mm(np.eye(4), W_true) > 40
    com, _ = _run(moving, "com")
    assert _error_mm(com.world, W_true) > 15  # a translation cannot do it
    for mode in ("moments", "auto"):
        res, _ = _run(moving, mode)
        err = _error_mm(res.world, W_true)
        assert err < 1.0, (mode, res.chosen, err)  # measured < 0.01 mm (same voxels)
        assert res.chosen.startswith("moments")


@pytest.mark.parametrize("degrees", [30.0, 120.0])
def test_physical_rotation_resampled_anisotropic(degrees):
    """The brain itself rotated about all three axes and resampled at 3×4×5 mm, header moved 300 mm."""
    R = _rotation(0, degrees) @ _rotation(1, 30.0) @ _rotation(2, 30.0)
    moving, W_true = _physically_moved(_colin(), R, np.array([10.0, -15.0, 20.0]), (3.0, 4.0, 5.0),
                                       np.array([300.0, 0.0, -100.0]))
    res, _ = _run(moving, "auto")
    err = _error_mm(res.world, W_true)
    assert err < 2.0, (res.chosen, err)  # measured ≈ 0.4-0.5 mm
    assert _error_mm(_run(moving, "com")[0].world, W_true) > 20


# --------------------------------------------------------------------------- 3. header flips


@pytest.mark.parametrize(
    "axes, swap, shift",
    [((0,), False, 0.0), ((0, 2), True, 0.0), ((1,), False, 250.0)],
    ids=["flip-x", "flip-xz-swap-xy", "flip-y-shift-250mm"],
)
def test_header_flip_with_reordered_voxels_keeps_world_identity(axes, swap, shift):
    """Same physical image, stored flipped (and transposed): no mirror may be introduced."""
    moving = _flipped(_colin(), axes, swap)
    W_true = np.eye(4)
    if shift:
        moving, W_true = _with_header(moving, np.eye(3), np.array([0.0, shift, 0.0]))
        assert _error_mm(np.eye(4), W_true) > 200
    res, _ = _run(moving, "auto")
    err = _error_mm(res.world, W_true)
    assert err < 0.5, (res.chosen, err)  # measured ≈ 0.0 mm
    if not shift:
        assert res.chosen == "header"


# --------------------------------------------------------------------------- 4. identical pair


def test_identical_pair_keeps_the_header():
    colin = _colin()
    res, mg = _run(colin, "auto", rotation_search=True)
    assert res.chosen == "header"
    assert res.scores["header"] <= min(res.scores.values()) + 1e-6
    pair = prepare_pair(colin, colin, spacing=SPACING)
    assert torch.equal(res.A0, pair.A0) and torch.equal(res.b0, pair.b0)
    assert any(name.startswith("rot[") for name in res.scores)


def test_inter_subject_in_common_space_keeps_the_header_and_recovers_a_shift():
    """Colin27 and MNI 2009c are both in MNI space: header is right; after a 300 mm shift, com/moments."""
    res, _ = _run(_mni(), "auto")
    assert res.chosen == "header"
    moved, W_true = _with_header(_mni(), np.eye(3), np.array([-300.0, 120.0, 60.0]))
    res, _ = _run(moved, "auto")
    assert res.chosen != "header"
    err = _error_mm(res.world, W_true)
    assert err < 4.0, (res.chosen, err)  # measured ≈ 1.8 mm (anatomy differs between subjects)


# --------------------------------------------------------------------------- 5. explicit file


def test_world_matrix_is_passed_through():
    fg, ft, _ = _fixed()
    moving, _ = _with_header(_colin(), _rotation(2, 10.0), np.array([5.0, 0.0, -3.0]))
    mg, mt = _working(moving)
    W = np.eye(4)
    W[:3, :3] = _rotation(1, 7.0) @ np.diag([1.05, 0.97, 1.0])
    W[:3, 3] = [3.0, -4.0, 12.0]
    res = initial_affine(ft, mt, fg.unit_to_world(), mg.unit_to_world(), "file", world_matrix=W)
    M = torch.as_tensor(mg.world_to_unit() @ W @ fg.unit_to_world(), dtype=torch.float64).unsqueeze(0)
    A, b = homogeneous_to_centred(M)
    assert res.chosen == "file" and np.array_equal(res.world, W)
    assert torch.equal(res.A0, A.float()) and torch.equal(res.b0, b.float())
    assert set(res.scores) == {"file"}


# --------------------------------------------------------------------------- rotation search


def test_rotation_search_rescues_a_partial_field_of_view():
    """Moving brain rotated 45° and cut to its lower 60 %: moments are fooled, the coarse search is not."""
    moving, W_true = _physically_moved(_colin(), _rotation(1, 45.0), np.array([5.0, 5.0, 5.0]),
                                       (4.0, 4.0, 4.0), np.zeros(3))
    fg, ft, _ = _fixed()
    mg, mt = _working(moving)
    mt = mt.clone()
    mt[:, :, int(0.6 * mt.shape[2]):] = 0.0
    args = (ft, mt, fg.unit_to_world(), mg.unit_to_world(), "auto")
    plain = initial_affine(*args)
    searched = initial_affine(*args, rotation_search=True)
    assert not any(n.startswith("rot[") for n in plain.scores)
    assert sum(n.startswith("rot[") for n in searched.scores) == 21
    assert _error_mm(plain.world, W_true) > 40  # measured ≈ 80 mm
    assert searched.chosen.startswith("rot[")
    assert _error_mm(searched.world, W_true) < 20  # measured ≈ 14 mm (30° grid)


# --------------------------------------------------------------------------- pieces and errors


def test_image_moments_in_world_mm():
    """A box of known size: centre and covariance (uniform: L²/12 per axis, voxel-centre sums)."""
    img = torch.zeros(1, 1, 21, 31, 41, dtype=torch.float64)
    img[..., 5:16, 10:21, 10:31] = 1.0  # 11 × 11 × 21 voxels
    u2w = np.diag([40.0, 60.0, 80.0, 1.0])  # 2 mm voxels
    u2w[:3, 3] = [-10.0, 5.0, 100.0]
    m = image_moments(img, u2w)
    np.testing.assert_allclose(m.centre, [-10.0 + 20.0, 5.0 + 30.0, 100.0 + 40.0], atol=1e-9)
    n = np.array([11, 11, 21])
    np.testing.assert_allclose(np.diag(m.cov), 4.0 * (n ** 2 - 1) / 12.0, rtol=1e-9)
    np.testing.assert_allclose(m.cov - np.diag(np.diag(m.cov)), 0.0, atol=1e-9)
    assert image_moments(torch.zeros(1, 1, 4, 4, 4), u2w).mass == 0.0


def test_every_candidate_and_the_choice_are_logged(caplog):
    moving, _ = _with_header(_colin(), np.eye(3), np.array([300.0, 0.0, 0.0]))
    with caplog.at_level(logging.INFO, logger="avsm.optim.initialise"):
        res, _ = _run(moving, "auto")
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "avsm.optim.initialise")
    for name in res.scores:
        assert f"{name}=" in text
    assert f"chosen {res.chosen}" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="avsm.optim.initialise"):
        _run(moving, "header")  # today's behaviour, but the log says it cannot work
    assert any("0 % overlap" in r.getMessage() for r in caplog.records)


def test_bad_arguments_and_empty_images():
    fg, ft, _ = _fixed()
    u = fg.unit_to_world()
    assert INIT_MODES == ("auto", "header", "com", "moments", "file")
    with pytest.raises(ValueError, match="unknown initialisation mode"):
        initial_affine(ft, ft, u, u, "nope")
    with pytest.raises(ValueError, match="world_matrix"):
        initial_affine(ft, ft, u, u, "auto", world_matrix=np.eye(4))
    with pytest.raises(ValueError, match="world_matrix"):
        initial_affine(ft, ft, u, u, "file")
    with pytest.raises(ValueError, match="invertible"):
        initial_affine(ft, ft, u, u, "file", world_matrix=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        initial_affine(ft[0], ft, u, u)
    empty = torch.zeros_like(ft)
    with pytest.raises(ValueError, match="non-zero"):
        initial_affine(ft, empty, u, u, "com")
    res = initial_affine(ft, empty, u, u, "auto")  # nothing to measure: today's behaviour
    assert res.chosen == "header" and np.array_equal(res.world, np.eye(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    moving, W_true = _with_header(_colin(), _rotation(2, 30.0), np.array([200.0, 0.0, 0.0]))
    fg, ft, _ = _fixed()
    mg, mt = _working(moving)
    args = (fg.unit_to_world(), mg.unit_to_world(), "auto")
    cpu = initial_affine(ft, mt, *args, rotation_search=True)
    gpu = initial_affine(ft.cuda(), mt.cuda(), *args, rotation_search=True)
    assert gpu.A0.is_cuda and gpu.b0.is_cuda
    assert gpu.chosen == cpu.chosen
    torch.testing.assert_close(gpu.A0.cpu(), cpu.A0, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.b0.cpu(), cpu.b0, atol=1e-5, rtol=0)
    assert _error_mm(gpu.world, W_true) < 1.0


def test_physically_mirrored_image_is_never_unmirrored():
    """Voxels flipped left-right with the header kept: a mirrored brain.  A proper rotation
    cannot undo it and an improper candidate (which would fit almost perfectly) is never offered."""
    colin = _colin()
    mirrored = colin.with_array(np.ascontiguousarray(colin.array[:, :, ::-1]))
    for mode in ("auto", "moments"):
        res, _ = _run(mirrored, mode, rotation_search=mode == "auto")  # _run asserts det > 0
        assert res.chosen in res.scores


def _world_points(u2w: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """``(1, 3, D, H, W)`` float64 world positions (mm) of a grid's voxels."""
    u = identity_map(shape, dtype=torch.float64)
    L, t = torch.as_tensor(u2w[:3, :3]), torch.as_tensor(u2w[:3, 3])
    return torch.einsum("ij,bjdhw->bidhw", L, u) + t.reshape(1, 3, 1, 1, 1)


def test_block_averaged_copies_keep_world_positions():
    """A world-linear ramp, block-averaged: each block's value is the ramp at the block's world centre."""
    from avsm.optim.initialise import _pooled

    fg, _, _ = _fixed()
    u2w = fg.unit_to_world()
    g = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    ramp = (_world_points(u2w, fg.shape) * g).sum(1, keepdim=True)
    small, small_u2w = _pooled(ramp, u2w, 3)
    assert small.shape[2:] == tuple(n // 3 for n in fg.shape)
    expected = (_world_points(small_u2w, tuple(small.shape[2:])) * g).sum(1, keepdim=True)
    torch.testing.assert_close(small.double(), expected, atol=1e-3, rtol=0)
