"""Tests of avsm.io.geometry: Grid <-> SimpleITK world geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from avsm.io.geometry import Grid, unit_affine_between
from avsm.io.image import Volume


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A 3x3 rotation matrix from Euler angles (radians)."""
    t = sitk.Euler3DTransform()
    t.SetRotation(ax, ay, az)
    return np.asarray(t.GetMatrix()).reshape(3, 3)


def oblique_image(size=(7, 9, 5), spacing=(0.7, 1.3, 2.9), origin=(-12.5, 30.25, 4.0),
                  angles=(0.3, -0.5, 0.9)) -> sitk.Image:
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(rotation(*angles).reshape(-1)))
    return img


def unit_from_itk_index(idx: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Unit coords (tensor order) of continuous ITK indices (x, y, z), ``(n, 3)``."""
    D, H, W = shape
    den = [max(n - 1, 1) for n in (D, H, W)]
    return np.stack([idx[:, 2] / den[0], idx[:, 1] / den[1], idx[:, 0] / den[2]], axis=1)


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return (M @ np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T).T[:, :3]


def all_voxel_centres(img: sitk.Image) -> np.ndarray:
    size = img.GetSize()
    return np.array([img.TransformIndexToPhysicalPoint(i)
                     for i in itertools.product(*(range(n) for n in size))])


def sorted_rows(a: np.ndarray) -> np.ndarray:
    a = np.round(a, 6) + 0.0
    return a[np.lexsort(a.T[::-1])]


def test_from_sitk_orders() -> None:
    img = oblique_image()
    g = Grid.from_sitk(img)
    assert g.shape == (5, 9, 7)
    assert g.itk_size == (7, 9, 5)
    assert g.spacing == pytest.approx(img.GetSpacing())
    assert g.origin == pytest.approx(img.GetOrigin())
    assert g.direction == pytest.approx(img.GetDirection())
    ref = g.reference_image()
    assert ref.GetSize() == img.GetSize()
    assert Grid.from_sitk(ref) == g


def test_unit_to_world_matches_sitk_oblique() -> None:
    img = oblique_image()
    g = Grid.from_sitk(img)
    rng = np.random.default_rng(0)
    idx = rng.uniform(-1, 1, size=(50, 3)) * np.array(img.GetSize())
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    got = apply(g.unit_to_world(), unit_from_itk_index(idx, g.shape))
    np.testing.assert_allclose(got, expected, atol=1e-9)
    # the corner voxel centres in particular
    M = g.unit_to_world()
    np.testing.assert_allclose(M[:3, 3], img.GetOrigin())
    last = img.TransformIndexToPhysicalPoint([n - 1 for n in img.GetSize()])
    np.testing.assert_allclose(apply(M, np.ones((1, 3)))[0], last, atol=1e-9)


def test_world_to_unit_round_trip() -> None:
    g = Grid.from_sitk(oblique_image())
    np.testing.assert_allclose(g.world_to_unit() @ g.unit_to_world(), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(g.unit_to_world() @ g.world_to_unit(), np.eye(4), atol=1e-12)


def test_resized_keeps_corners() -> None:
    g = Grid.from_sitk(oblique_image())
    r = g.resized((9, 4, 13))
    assert r.shape == (9, 4, 13)
    np.testing.assert_allclose(r.world_corners(), g.world_corners(), atol=1e-9)
    np.testing.assert_allclose(r.unit_to_world(), g.unit_to_world(), atol=1e-9)
    # s' = s (N - 1) / (N' - 1), ITK order
    np.testing.assert_allclose(r.spacing, [0.7 * 6 / 12, 1.3 * 8 / 3, 2.9 * 4 / 8])
    assert r.direction == g.direction


def test_working_grid() -> None:
    img = oblique_image(size=(40, 70, 23), spacing=(1.0, 0.9, 3.3))
    g = Grid.from_sitk(img)
    w = g.working_grid(2.0)
    assert all(n % 16 == 0 and n >= 32 for n in w.shape)
    # (N-1) * spacing >= extent at the target spacing, so spacing <= target
    assert all(s <= 2.0 + 1e-9 for s in w.spacing)
    assert w.shape == (48, 48, 32)  # z: 72.6/2 -> 38 -> 48; y: 62.1/2 -> 33 -> 48; x: 39/2 -> 21 -> 32
    np.testing.assert_allclose(w.world_corners(), g.world_corners(), atol=1e-9)
    np.testing.assert_allclose(unit_affine_between(w, g), np.eye(4), atol=1e-12)
    assert g.working_grid(shape=(16, 17, 18)).shape == (16, 17, 18)
    assert g.working_grid(None, multiple_of=8, min_size=8).shape == (24, 72, 40)
    with pytest.raises(ValueError):
        g.working_grid(0.0)


def test_canonical_keeps_voxel_centres_and_is_near_identity() -> None:
    # oblique (up to ~35 degrees off a signed axis permutation), so that every
    # column of the direction has one clearly largest component
    for angles in [(0.3, -0.3, 0.6), (2.0, 0.1, -2.6), (np.pi / 2 + 0.1, 0.2, np.pi - 0.2)]:
        img = oblique_image(angles=angles)
        g = Grid.from_sitk(img)
        c = g.canonical()
        cimg = c.reference_image()
        # corners as a set of points
        corners = lambda im: np.array([im.TransformIndexToPhysicalPoint(
            [(n - 1) * b for n, b in zip(im.GetSize(), bits)]) for bits in itertools.product((0, 1), repeat=3)])
        np.testing.assert_allclose(sorted_rows(corners(cimg)), sorted_rows(corners(img)), atol=1e-6)
        np.testing.assert_allclose(sorted_rows(all_voxel_centres(cimg)), sorted_rows(all_voxel_centres(img)),
                                   atol=1e-6)
        Dm = c.direction_matrix
        for k in range(3):
            j = int(np.argmax(np.abs(Dm[:, k])))
            assert j == k and Dm[j, k] > 0
        assert sorted(c.spacing) == sorted(g.spacing)


def test_canonical_very_oblique_keeps_points() -> None:
    # near 45 degrees there is no clear nearest axis; the diagonal must still be positive
    img = oblique_image(angles=(0.3, -0.5, 0.9))
    g = Grid.from_sitk(img)
    c = g.canonical()
    assert np.all(np.diag(c.direction_matrix) > 0)
    np.testing.assert_allclose(sorted_rows(all_voxel_centres(c.reference_image())),
                               sorted_rows(all_voxel_centres(img)), atol=1e-6)


def test_canonical_volume_matches_dicomorient() -> None:
    rng = np.random.default_rng(1)
    small = rotation(0.25, -0.3, 0.2)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            P = np.zeros((3, 3))
            for k, (j, s) in enumerate(zip(perm, signs)):
                P[j, k] = s
            img = sitk.GetImageFromArray(rng.random((4, 5, 6)).astype(np.float32))
            img.SetSpacing((0.5, 1.0, 2.0))
            img.SetOrigin((3.0, -4.0, 5.0))
            img.SetDirection(tuple((small @ P).reshape(-1)))
            vol = Volume.from_sitk(img)
            can = vol.canonical()
            ref = sitk.DICOMOrient(img, "LPS")
            assert can.grid.is_close(Grid.from_sitk(ref), 1e-9)
            np.testing.assert_array_equal(can.array, sitk.GetArrayFromImage(ref))


def test_unit_affine_between_through_world() -> None:
    fixed = Grid.from_sitk(oblique_image())
    moving = Grid.from_sitk(oblique_image(size=(11, 6, 8), spacing=(1.1, 0.6, 1.7), origin=(1.0, 2.0, 3.0),
                                          angles=(-0.2, 0.4, 0.1)))
    A = unit_affine_between(fixed, moving)
    u = np.random.default_rng(2).random((20, 3))
    np.testing.assert_allclose(apply(moving.unit_to_world(), apply(A, u)), apply(fixed.unit_to_world(), u),
                               atol=1e-9)
    np.testing.assert_allclose(unit_affine_between(fixed, fixed), np.eye(4), atol=1e-12)


def test_grid_validation() -> None:
    ok = dict(shape=(2, 3, 4), spacing=(1, 1, 1), origin=(0, 0, 0), direction=tuple(np.eye(3).reshape(-1)))
    Grid(**ok)
    for key, bad in [("shape", (0, 3, 4)), ("shape", (2, 3)), ("spacing", (1, 0, 1)),
                     ("origin", (0, float("nan"), 0)), ("direction", (0,) * 9)]:
        with pytest.raises(ValueError):
            Grid(**{**ok, key: bad})


def test_length_one_axis_uses_index() -> None:
    g = Grid(shape=(1, 3, 4), spacing=(1.0, 2.0, 5.0), origin=(0, 0, 0), direction=tuple(np.eye(3).reshape(-1)))
    M = g.unit_to_world()
    np.testing.assert_allclose(apply(M, np.array([[1.0, 0, 0]]))[0], [0, 0, 5.0])  # u0 = 1 -> z index 1


@st.composite
def geometries(draw):
    size = tuple(draw(st.integers(1, 6)) for _ in range(3))
    spacing = tuple(draw(st.floats(0.1, 5.0)) for _ in range(3))
    origin = tuple(draw(st.floats(-200.0, 200.0)) for _ in range(3))
    q = np.array([draw(st.floats(-1.0, 1.0)) for _ in range(4)])
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    if draw(st.booleans()):
        R = R @ np.diag([1.0, 1.0, -1.0])  # improper (left-handed) directions occur in real files
    u = np.array([[draw(st.floats(-0.5, 1.5)) for _ in range(3)] for _ in range(4)])
    return size, spacing, origin, R, u


@settings(max_examples=60, deadline=None)
@given(geometries())
def test_unit_to_world_property(geom) -> None:
    size, spacing, origin, R, u = geom
    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(R.reshape(-1)))
    g = Grid.from_sitk(img)
    den = [max(n - 1, 1) for n in size]  # ITK order
    idx = np.stack([u[:, 2] * den[0], u[:, 1] * den[1], u[:, 0] * den[2]], axis=1)
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    np.testing.assert_allclose(apply(g.unit_to_world(), u), expected, atol=1e-7)
    np.testing.assert_allclose(apply(g.world_to_unit(), expected), u, atol=1e-7)
    c = g.canonical()
    np.testing.assert_allclose(sorted_rows(c.world_corners()), sorted_rows(g.world_corners()), atol=1e-6)
