"""Scaling and squaring against the RK4 transport integrator, against analytic truth."""

from __future__ import annotations

import torch

from avsm.core.coords import affine_map, identity_map, invert_affine, unit_spacing
from avsm.core.integrate import advect_map, svf_exp
from avsm.core.sampling import compose
from avsm.core.smoothing import MultiGaussianSmoother
from avsm.models.vsvf import VSVF

SHAPE = (20, 24, 22)
#: stated bound: SS (7 squarings) and RK4 (40 steps) differ by at most 8 % of the largest velocity
#: (in voxels) for smooth fields; both are converged in time (measured: RK4 40 vs 200 steps 5e-8
#: voxel, SS 7 vs 12 squarings 0.0075 voxel at 3 voxels), so the difference is the two spatial
#: discretisations (trilinear composition vs central differences): 0.035 voxel at 1 voxel,
#: 0.20 voxel at 3 voxels on a 20×24×22 grid.
SS_VS_RK4_RELATIVE = 0.08


def _smooth_velocity(seed: int, max_voxels: float, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)
    v = MultiGaussianSmoother(shape, sigmas=(0.1, 0.2))(m)
    h = torch.tensor(unit_spacing(shape), dtype=torch.float64).view(1, 3, 1, 1, 1)
    return v / (v.abs() / h).amax() * max_voxels  # largest component = max_voxels voxels


def _voxels(d: torch.Tensor, shape=SHAPE) -> torch.Tensor:
    n = torch.tensor([s - 1 for s in shape], dtype=d.dtype).view(1, 3, 1, 1, 1)
    return (d * n).abs()


def test_scaling_and_squaring_matches_rk4_advection() -> None:
    idm = identity_map(SHAPE, dtype=torch.float64)
    for seed, amp in ((0, 1.0), (1, 3.0)):
        v = _smooth_velocity(seed, amp)
        rk4 = advect_map(idm, v, steps=40)  # exp(-v) by the transport equation
        ss = svf_exp(-v, squarings=7)
        err = _voxels(ss - rk4)[..., 2:-2, 2:-2, 2:-2].max()
        disp = _voxels(rk4 - idm).max()
        assert disp > 0.5 * amp  # the test has something to measure
        assert err < SS_VS_RK4_RELATIVE * amp, (amp, float(err))
        assert _voxels(svf_exp(-v, squarings=7) - svf_exp(-v, squarings=12)).max() < 0.01  # converged
    # too few squarings is measurably worse (the bound has teeth)
    v = _smooth_velocity(1, 3.0)
    rough = svf_exp(-v, squarings=0)
    assert _voxels(rough - advect_map(idm, v, steps=40))[..., 2:-2, 2:-2, 2:-2].max() > 2 * SS_VS_RK4_RELATIVE * 3


def test_zero_velocity_is_identity_and_constant_velocity_is_translation() -> None:
    idm = identity_map(SHAPE, dtype=torch.float64)
    assert torch.equal(svf_exp(torch.zeros(1, 3, *SHAPE, dtype=torch.float64)), idm)
    c = torch.tensor([0.03, -0.02, 0.05], dtype=torch.float64).view(1, 3, 1, 1, 1)
    v = c.expand(1, 3, *SHAPE)
    assert torch.allclose(svf_exp(v), idm + c, atol=1e-12)
    assert torch.allclose(advect_map(idm, v, steps=10), idm - c, atol=1e-12)


def test_forward_compose_inverse_is_identity() -> None:
    idm = identity_map(SHAPE, dtype=torch.float64)
    v = _smooth_velocity(2, 2.5)
    fwd, inv = svf_exp(v), svf_exp(-v)
    err = _voxels(compose(fwd, inv) - idm)[..., 3:-3, 3:-3, 3:-3].max()
    assert err < 0.15, float(err)  # 0.09 voxel measured for a 2.5-voxel field
    assert _voxels(fwd - idm).max() > 1.0


def test_vsvf_ss_and_rk4_models_agree_and_invert() -> None:
    """The same momentum through both integrators gives the same map; the SS inverse undoes it."""
    full, low = (24, 28, 24), (12, 14, 12)
    A = torch.eye(3, dtype=torch.float64)[None] * 1.05
    b = torch.tensor([[0.02, -0.01, 0.03]], dtype=torch.float64)
    phi0 = affine_map(A, b, full)
    g = torch.Generator().manual_seed(3)
    m = 0.4 * torch.randn(1, 3, *low, generator=g, dtype=torch.float64)
    rk = VSVF(full, low, method="rk4", steps=20).double()
    ss = VSVF(full, low, method="ss", squarings=7).double()
    a, c = rk(m, phi0), ss(m, phi0)
    disp = float(_voxels(a.phi - phi0, full).max())
    assert disp > 1.0
    # the velocity lives on a 12-voxel grid here, so the spatial discretisations differ more (measured 15 %)
    assert _voxels(a.phi - c.phi, full)[..., 2:-2, 2:-2, 2:-2].max() < 0.2 * disp
    assert torch.allclose(a.energy, c.energy)
    Ai, bi = invert_affine(A, b)
    inv = ss.inverse([c.v], affine_map(Ai, bi, full))
    back = compose(c.phi, inv)  # (Φ0∘exp(−v)) ∘ (exp(v)∘Φ0⁻¹) = id on the moving grid
    err = _voxels(back - identity_map(full, dtype=torch.float64), full)[..., 3:-3, 3:-3, 3:-3].max()
    assert err < 0.12 * disp, float(err)  # 0.19 voxel measured for a 2.2-voxel field on a 12-voxel grid


def test_gradcheck_svf_exp() -> None:
    shape = (5, 6, 4)
    v = (0.05 * torch.randn(1, 3, *shape, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: svf_exp(u, squarings=3), (v,), eps=1e-6, atol=1e-5)
