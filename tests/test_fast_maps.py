"""Fast map evaluation for the outputs: separable sampling, one-product affine grids, world maps.

Each fast path is checked against the plain definition it replaces:

* :func:`avsm.core.sampling.sample_axis_aligned` / :func:`~avsm.core.sampling.sample_affine`
  against ``warp(field, grid_affine_map(M), padding="border")`` (points inside and outside);
* :func:`~avsm.core.sampling.affine_sampling_grid` against ``to_grid_sample(grid_affine_map(M))``;
* ``RegistrationResult.world_map`` against ``U2W(phi ∘ inner)`` through ``compose`` on axis-aligned
  (permuted, flipped, anisotropic) and oblique grids, whole and in slabs, float64 and float32;
* the ``1InverseWarp`` field against the inverse composed with the affine, and its
  fixed-point part (outside the moving box) against ``x + d(x) = z``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avsm.core.coords import to_grid_sample
from avsm.core.sampling import (
    affine_sampling_grid,
    axis_aligned,
    sample_affine,
    sample_axis_aligned,
    warp,
)
from avsm.io.geometry import Grid
from avsm.transform import RegistrationResult, apply_homogeneous, grid_affine_map, grid_world_points


def _perm_matrix() -> np.ndarray:
    """Output axes (0, 1, 2) -> input axes (2, 0, 1), one flipped, scaled, shifted beyond the box."""
    return np.array([[0.0, 1.1, 0.0, -0.05], [0.0, 0.0, -0.9, 1.0], [0.4, 0.0, 0.0, 0.3], [0, 0, 0, 1]])


def _oblique_matrix() -> np.ndarray:
    return np.array([[0.9, 0.2, 0.05, 0.02], [-0.1, 1.05, 0.1, -0.04], [0.07, -0.05, 0.95, 0.06], [0, 0, 0, 1]])


def test_axis_aligned_detection() -> None:
    perm, scale, shift = axis_aligned(_perm_matrix())  # type: ignore[misc]
    assert perm == (1, 2, 0) and np.allclose(scale, (1.1, -0.9, 0.4)) and np.allclose(shift, (-0.05, 1.0, 0.3))
    assert axis_aligned(_oblique_matrix()) is None
    assert axis_aligned(np.eye(4)) == ((0, 1, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    near = np.eye(4)
    near[0, 1] = 1e-13  # rounding of direction products: still axis-aligned
    assert axis_aligned(near) is not None


@pytest.mark.parametrize("shape", [(20, 17, 23), (1, 9, 5), (6, 1, 1)])
def test_separable_and_affine_grid_sampling_equal_grid_sample(shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    field = torch.randn(1, 3, 14, 15, 9, generator=g, dtype=torch.float64)
    for M in (_perm_matrix(), _oblique_matrix()):
        ref = warp(field, grid_affine_map(M, shape), padding="border")
        grid = affine_sampling_grid(M, shape, dtype=torch.float64)
        assert float((grid - to_grid_sample(grid_affine_map(M, shape))).abs().max()) < 1e-14
        assert float((sample_affine(field, M, shape) - ref).abs().max()) < 1e-12
    ax = axis_aligned(_perm_matrix())
    assert ax is not None
    ref = warp(field, grid_affine_map(_perm_matrix(), shape), padding="border")
    assert float((sample_axis_aligned(field, ax, shape) - ref).abs().max()) < 1e-12
    f32 = sample_axis_aligned(field.float(), ax, shape)
    assert f32.dtype == torch.float32 and float((f32 - ref).abs().max()) < 1e-5


def _result(fixed: Grid, moving: Grid, work_f: Grid, work_m: Grid, seed: int = 0) -> RegistrationResult:
    """A result with a random affine and a smooth random deformation (both directions)."""
    from avsm.core.coords import affine_map
    from avsm.core.smoothing import MultiGaussianSmoother

    g = torch.Generator().manual_seed(seed)
    A = (torch.eye(3) + 0.05 * torch.randn(3, 3, generator=g))[None]
    b = 0.03 * torch.randn(1, 3, generator=g)
    smooth = MultiGaussianSmoother(work_f.shape, (0.3,), (1.0,))
    d = smooth(torch.randn(1, 3, *work_f.shape, generator=g))
    phi = affine_map(A, b, work_f.shape) + 0.03 * d / d.abs().max()
    smooth_m = MultiGaussianSmoother(work_m.shape, (0.3,), (1.0,))
    e = smooth_m(torch.randn(1, 3, *work_m.shape, generator=g))
    from avsm.core.coords import identity_map

    phi_inv = identity_map(work_m.shape) + 0.03 * e / e.abs().max()
    return RegistrationResult(fixed_grid=work_f, moving_grid=work_m, fixed_original=fixed, moving_original=moving,
                              A=A, b=b, phi=phi, phi_inv=phi_inv, phi_affine=affine_map(A, b, work_f.shape),
                              method="test")


def _reference_world_map(res: RegistrationResult, grid: Grid, inverse: bool) -> torch.Tensor:
    """``U2W_dst(phi ∘ inner)`` through ``compose`` (the definition), float64."""
    src, dst = (res.moving_grid, res.fixed_grid) if inverse else (res.fixed_grid, res.moving_grid)
    inner = grid_affine_map(src.world_to_unit() @ grid.unit_to_world(), grid.shape)
    unit = res._compose(inverse, False, inner)
    return apply_homogeneous(dst.unit_to_world(), unit)


def _grids() -> tuple[Grid, Grid, Grid, Grid]:
    # images in an ASL-like orientation (axes permuted and flipped), working grids axis-aligned and coarser
    fixed = Grid((16, 20, 18), (1.0, 1.0, 1.2), (-8.0, 10.0, -9.0), (0, 0, 1, -1, 0, 0, 0, 1, 0))
    moving = Grid((15, 21, 17), (1.1, 0.9, 1.0), (-7.0, 9.0, -10.0), (0, 0, 1, -1, 0, 0, 0, 1, 0))
    work_f = Grid((11, 9, 8), (2.5, 2.2, 1.6), (-9.0, -10.0, -8.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    work_m = Grid((10, 9, 9), (2.4, 2.3, 1.7), (-10.0, -9.5, -7.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return fixed, moving, work_f, work_m


@pytest.mark.parametrize("inverse", [False, True])
def test_world_map_equals_composition(inverse: bool) -> None:
    fixed, moving, work_f, work_m = _grids()
    res = _result(fixed, moving, work_f, work_m)
    c, s = np.cos(0.4), np.sin(0.4)
    oblique = Grid((7, 9, 8), (1.3, 0.8, 1.1), (-5.0, -3.0, 2.0), (c, -s, 0, s, c, 0, 0, 0, 1))
    own = moving if inverse else fixed
    src = res.moving_grid if inverse else res.fixed_grid
    assert axis_aligned(src.world_to_unit() @ own.unit_to_world()) is not None  # the separable path
    assert axis_aligned(src.world_to_unit() @ oblique.unit_to_world()) is None  # the affine-grid path
    for grid in (own, oblique, own.slab(3, 9), own.slab(5, 6)):
        ref = _reference_world_map(res, grid, inverse)
        got = res.world_map(grid, inverse=inverse)
        assert got.dtype == torch.float64 and float((got - ref).abs().max()) < 1e-9
        got32 = res.world_map(grid, inverse=inverse, dtype=torch.float32)
        assert got32.dtype == torch.float32 and float((got32.double() - ref).abs().max()) < 1e-4
    # slabs equal the whole grid
    whole = res.world_map(own, inverse=inverse)
    parts = torch.cat([res.world_map(own.slab(a, min(a + 4, own.shape[0])), inverse=inverse)
                       for a in range(0, own.shape[0], 4)], dim=2)
    assert float((parts - whole).abs().max()) < 1e-12


def test_inverse_warp_field_definition_and_fixed_point_part() -> None:
    from avsm.export.itk import _affine_image_grid, field_slab, world_affine

    fixed, moving, work_f, work_m = _grids()
    res = _result(fixed, moving, work_f, work_m, seed=3)
    M = world_affine(res)
    e = field_slab(res, "inverse_warp", fixed, M)
    x = grid_world_points(fixed)[0].numpy()
    # inside the moving working box: avsm's inverse at Affine(z)
    u = apply_homogeneous(res.moving_grid.world_to_unit() @ M, torch.as_tensor(x)[None])[0].numpy()
    inside = ((u > 1e-3) & (u < 1 - 1e-3)).all(0)
    outside = ((u < -1e-3) | (u > 1 + 1e-3)).any(0)
    assert inside.sum() > 100 and outside.sum() > 100
    ref = (_reference_world_map(res, _affine_image_grid(M, fixed), True)[0].numpy() - x)
    assert np.abs(e - ref)[:, inside].max() < 1e-9
    # outside: x + d(x) = z with d(x) = M^-1(total(x)) - x read on the clipped fixed working box
    zo = x[:, outside]
    p = zo + e[:, outside]
    W2U, U2W = res.fixed_grid.world_to_unit(), res.fixed_grid.unit_to_world()
    pc = (U2W[:3, :3] @ np.clip(W2U[:3, :3] @ p + W2U[:3, 3:], 0, 1) + U2W[:3, 3:])
    total = res.map_points(torch.as_tensor(pc)[None])[0].numpy()
    d = np.linalg.inv(M)[:3, :3] @ total + np.linalg.inv(M)[:3, 3:] - pc
    assert np.abs(p + d - zo).max() < 1e-4
