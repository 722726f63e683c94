"""Analytic-truth tests of the transform core (coords, sampling, Jacobian, smoother, integrator)."""

from __future__ import annotations

import math

import pytest
import torch

from avsm.core.coords import (
    affine_map,
    centred_to_homogeneous,
    compose_affine,
    homogeneous_to_centred,
    identity_map,
    invert_affine,
    to_grid_sample,
)
from avsm.core.integrate import advect_map
from avsm.core.jacobian import count_folds, jacobian_determinant
from avsm.core.sampling import compose, resample_map, warp
from avsm.core.smoothing import MultiGaussianSmoother
from avsm.models.vsvf import VSVF

SHAPE = (6, 7, 9)


def _rotation(angles: tuple[float, float, float], dtype=torch.float64) -> torch.Tensor:
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=dtype)
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=dtype)
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]], dtype=dtype)
    return rz @ ry @ rx


def test_identity_map_values_and_grid_sample_conversion():
    phi = identity_map(SHAPE, dtype=torch.float64)
    assert phi.shape == (1, 3, *SHAPE)
    assert phi[0, 0, 5, 0, 0] == 1.0 and phi[0, 1, 0, 6, 0] == 1.0 and phi[0, 2, 0, 0, 8] == 1.0
    assert phi[0, 2, 0, 0, 4] == pytest.approx(4 / 8)
    g = to_grid_sample(phi)
    assert g.shape == (1, *SHAPE, 3)
    # grid_sample's x is the W axis: reversed order, range [-1, 1]
    assert g[0, 0, 0, 8, 0] == 1.0 and g[0, 5, 0, 0, 2] == 1.0 and g[0, 0, 0, 0].tolist() == [-1, -1, -1]


def test_identity_warp_is_exact():
    img = torch.rand(2, 2, *SHAPE, dtype=torch.float64)
    out = warp(img, identity_map(SHAPE, batch=2, dtype=torch.float64))
    assert torch.equal(out, img) or torch.allclose(out, img, atol=1e-14, rtol=0)
    lab = torch.randint(0, 5, (1, 1, *SHAPE))
    for mode in ("nearest", "label"):
        assert torch.equal(warp(lab, identity_map(SHAPE), mode=mode), lab)


def test_integer_translation_equals_shift():
    img = torch.rand(1, 1, *SHAPE, dtype=torch.float64)
    phi = identity_map(SHAPE, dtype=torch.float64).clone()
    phi[:, 1] += 2.0 / (SHAPE[1] - 1)  # read 2 voxels further along H
    out = warp(img, phi)
    assert torch.allclose(out[:, :, :, :-2], img[:, :, :, 2:], atol=1e-12)
    assert torch.all(out[:, :, :, -2:] == 0)


def test_known_affine_maps_points():
    A = (_rotation((0.1, -0.2, 0.3)) * 1.1).unsqueeze(0)
    b = torch.tensor([[0.05, -0.1, 0.02]], dtype=torch.float64)
    phi = affine_map(A, b, SHAPE)
    c = torch.full((3,), 0.5, dtype=torch.float64)
    for idx in [(0, 0, 0), (5, 6, 8), (2, 3, 4)]:
        x = torch.tensor([i / (n - 1) for i, n in zip(idx, SHAPE)], dtype=torch.float64)
        assert torch.allclose(phi[0, :, idx[0], idx[1], idx[2]], A[0] @ (x - c) + c + b[0], atol=1e-12)
    # homogeneous round trip
    A2, b2 = homogeneous_to_centred(centred_to_homogeneous(A, b))
    assert torch.allclose(A2, A) and torch.allclose(b2, b)


def test_affine_composition_matches_matrix_product():
    A1 = (_rotation((0.05, 0.02, -0.04)) * 0.95).unsqueeze(0)
    b1 = torch.tensor([[0.01, 0.02, -0.01]], dtype=torch.float64)
    A2 = _rotation((-0.03, 0.04, 0.02)).unsqueeze(0) * 1.02
    b2 = torch.tensor([[-0.02, 0.01, 0.015]], dtype=torch.float64)
    shape = (12, 14, 16)
    inner = affine_map(A1, b1, shape)
    outer = affine_map(A2, b2, shape)
    A, b = compose_affine(A2, b2, A1, b1)
    expected = affine_map(A, b, shape)
    got = compose(outer, inner)
    inside = ((inner >= 0) & (inner <= 1)).all(1, keepdim=True).expand_as(got)
    assert inside.float().mean() > 0.5
    assert torch.allclose(got[inside], expected[inside], atol=1e-10)
    # inverse composes to the identity
    Ai, bi = invert_affine(A, b)
    Ae, be = compose_affine(Ai, bi, A, b)
    assert torch.allclose(Ae[0], torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(be, torch.zeros_like(be), atol=1e-12)


def test_det_jacobian_of_affine_equals_det_A_and_no_folds():
    A = (_rotation((0.3, 0.1, -0.2)) @ torch.diag(torch.tensor([1.2, 0.8, 0.9], dtype=torch.float64))).unsqueeze(0)
    phi = affine_map(A, torch.zeros(1, 3, dtype=torch.float64), SHAPE)
    det = jacobian_determinant(phi)
    assert torch.allclose(det, torch.det(A[0]).expand_as(det), atol=1e-10)
    assert int(count_folds(phi)[0]) == 0
    # a reflection folds everywhere
    R = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)).unsqueeze(0)
    assert int(count_folds(affine_map(R, torch.zeros(1, 3, dtype=torch.float64), SHAPE))[0]) == math.prod(SHAPE)


def test_hand_built_fold_count():
    phi = identity_map((5, 5, 5), dtype=torch.float64).clone()
    # swap two neighbouring slices' coordinates along D at the centre: folds exactly there
    phi[0, 0, 2, 2, 2] = phi[0, 0, 2, 2, 2] + 0.6  # jumps past its neighbour at index 3
    det = jacobian_determinant(phi)
    assert (det < 0).sum() == 1 and det[0, 3, 2, 2] < 0


def test_resample_map_keeps_affine_maps_affine():
    A = (_rotation((0.2, -0.1, 0.15)) * 1.05).unsqueeze(0)
    b = torch.tensor([[0.03, -0.02, 0.01]], dtype=torch.float64)
    low = affine_map(A, b, (5, 6, 7))
    up = resample_map(low, (9, 11, 13))
    assert torch.allclose(up, affine_map(A, b, (9, 11, 13)), atol=1e-12)


def test_label_warp_never_invents_values():
    lab = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int16)
    lab[:, :, 2:5, 2:6, 1:7] = 7
    lab[:, :, 4:7, 3:7, 2:5] = 3
    A = _rotation((0.3, 0.2, 0.1)).unsqueeze(0).float()
    phi = affine_map(A, torch.tensor([[0.05, 0.0, -0.03]]), (8, 8, 8))
    for mode in ("nearest", "label"):
        out = warp(lab, phi, mode=mode)
        assert out.dtype == torch.int16
        assert set(out.unique().tolist()) <= {0, 3, 7}


def test_zero_momentum_gives_identity_and_constant_velocity_translates():
    vs = VSVF((16, 18, 20)).double()
    phi0 = identity_map((16, 18, 20), dtype=torch.float64)
    m = torch.zeros(1, 3, *vs.low_shape, dtype=torch.float64)
    step = vs(m, phi0)
    assert torch.allclose(step.phi, phi0, atol=1e-14)
    assert float(step.energy) == 0.0
    v = torch.tensor([0.05, -0.03, 0.02], dtype=torch.float64).view(1, 3, 1, 1, 1)
    v = v.expand(1, 3, 8, 9, 10)
    phi = advect_map(identity_map((8, 9, 10), dtype=torch.float64), v, steps=10)
    disp = phi - identity_map((8, 9, 10), dtype=torch.float64)
    assert torch.allclose(disp, -v, atol=1e-12)  # Φ = id ∘ exp(-v): read at x - v
    assert torch.allclose(disp.norm(dim=1), v.norm(dim=1), atol=1e-12)


def _smooth_random_velocity(shape, amp, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)
    sm = MultiGaussianSmoother(shape, sigmas=(0.15,), weights=(1.0,))
    v = sm(m)
    return v * (amp / v.abs().max())


def test_forward_composed_with_inverse_is_identity():
    shape = (24, 26, 28)
    vs = VSVF(shape, shape).double()
    v = _smooth_random_velocity(shape, 0.05)
    idm = identity_map(shape, dtype=torch.float64)
    fwd = advect_map(idm, v, steps=20)  # id ∘ exp(-v)
    inv = vs.exp(v)  # exp(v)
    err = (compose(fwd, inv) - idm)
    interior = err[:, :, 3:-3, 3:-3, 3:-3]
    # max displacement is 0.05 of the domain (~1.3 voxels); error stays below 2 % of a voxel
    assert interior.abs().max() < 0.02 / (min(shape) - 1)


def test_smoother_properties():
    shape = (10, 12, 14)
    sm = MultiGaussianSmoother(shape).double()
    assert abs(sum(sm.weights) - 1) < 1e-12
    assert sm.weights[0] < sm.weights[-1]
    m = torch.zeros(1, 3, *shape, dtype=torch.float64)
    m[0, 0, 5, 6, 7] = 1.0
    v = sm(m)
    assert v[0, 0].argmax() == torch.tensor(5 * 12 * 14 + 6 * 14 + 7)
    assert torch.all(v[0, 0] > 0) and torch.all(v[0, 1:] == 0)
    # linear convolution with zero padding: symmetric impulse response, no wrap-around
    a = torch.zeros(1, 1, *shape, dtype=torch.float64)
    a[0, 0, 0, 0, 0] = 1.0
    r = sm(a)
    assert r[0, 0, 0, 0, 0] > r[0, 0, -1, 0, 0]
    # self-adjoint: <a, K b> = <K a, b>  (so <m, Km> is a proper energy)
    b = torch.randn(1, 1, *shape, dtype=torch.float64)
    c = torch.randn(1, 1, *shape, dtype=torch.float64)
    assert torch.allclose((b * sm(c)).sum(), (sm(b) * c).sum(), rtol=1e-10)
    assert (b * sm(b)).sum() > 0


def test_gradcheck_warp_compose_smoother_integrator():
    torch.manual_seed(0)
    shape = (4, 5, 6)
    img = torch.rand(1, 1, *shape, dtype=torch.float64, requires_grad=True)
    phi = (identity_map(shape, dtype=torch.float64) + 0.05 * torch.rand(1, 3, *shape, dtype=torch.float64))
    phi.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, p: warp(i, p), (img, phi))
    outer = (identity_map(shape, dtype=torch.float64) + 0.05 * torch.rand(1, 3, *shape, dtype=torch.float64))
    outer.requires_grad_(True)
    assert torch.autograd.gradcheck(compose, (outer, phi))
    sm = MultiGaussianSmoother(shape).double()
    m = torch.randn(1, 3, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sm, (m,))
    v = (0.02 * torch.randn(1, 3, *shape, dtype=torch.float64)).requires_grad_(True)
    phi0 = identity_map(shape, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, vv: advect_map(p, vv, steps=3), (phi0, v))
