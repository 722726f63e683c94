"""mk-LNCC and consistency losses against analytic truth and a naive loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from avsm.core.coords import identity_map, invert_affine
from avsm.losses.consistency import (
    affine_inverse_consistency,
    decaying_weight,
    map_inverse_consistency,
)
from avsm.losses.lncc import MKLNCC, Window, lncc_map, paper_windows
from avsm.losses.similarity import MSE, NCC


def _smooth_image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[s // 2 for s in shape], generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=True)


def test_paper_window_sets():
    w = paper_windows((96, 112, 96))
    assert [(x.size, x.weight, x.dilation) for x in w] == [(24, 0.3, 2), (48, 0.7, 2)]
    assert [x.stride for x in w] == [6, 12]
    w = paper_windows((160, 192, 128))
    assert [(x.size, x.weight) for x in w] == [(8, 0.1), (16, 0.3), (32, 0.6)]
    w = paper_windows((40, 48, 40))
    assert [(x.size, x.weight, x.dilation) for x in w] == [(20, 1.0, 1)]


def test_lncc_matches_naive_window_loop():
    shape = (9, 10, 11)
    I = torch.rand(1, 1, *shape, dtype=torch.float64)
    J = 0.5 * I + 0.3 * torch.rand(1, 1, *shape, dtype=torch.float64)
    win = Window(size=3, weight=1.0, dilation=2, stride=2)
    fast = lncc_map(I, J, win)[0, 0]
    ext = (win.size - 1) * win.dilation + 1
    out_shape = [(n - ext) // win.stride + 1 for n in shape]
    assert list(fast.shape) == out_shape
    for a, b, c in itertools.product(*[range(n) for n in out_shape]):
        sl = tuple(slice(p * win.stride, p * win.stride + ext, win.dilation) for p in (a, b, c))
        x = I[0, 0][sl].flatten()
        y = J[0, 0][sl].flatten()
        xc, yc = x - x.mean(), y - y.mean()
        expected = (xc * yc).sum() ** 2 / ((xc * xc).sum() * (yc * yc).sum() + 1e-5)
        assert fast[a, b, c] == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


def test_mklncc_self_optimum_and_affine_intensity_invariance():
    img = _smooth_image((20, 22, 24))
    loss = MKLNCC()
    assert float(loss(img, img)) < 1e-6
    other = _smooth_image((20, 22, 24), seed=1)
    assert float(loss(other, img)) > 0.1
    assert float(loss(2.5 * img + 0.7, img)) == pytest.approx(float(loss(img, img)), abs=1e-6)
    assert float(loss(3.0 * other + 1.0, img)) == pytest.approx(float(loss(other, img)), abs=1e-4)


def test_mklncc_gradcheck():
    I = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    J = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    loss = MKLNCC([Window(3, 0.4, 1, 1), Window(4, 0.6, 1, 2)])
    assert torch.autograd.gradcheck(lambda x: loss(x, J), (I,))


def test_global_ncc_and_mse():
    img = _smooth_image((8, 9, 10))
    assert float(NCC()(img * 3 + 1, img)) < 1e-6
    assert float(MSE()(img, img)) == 0.0


def test_affine_inverse_consistency_zero_for_exact_inverse():
    A = torch.tensor([[[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[0.1, -0.05, 0.02]], dtype=torch.float64)
    Ai, bi = invert_affine(A, b)
    assert float(affine_inverse_consistency(A, b, Ai, bi)) < 1e-20
    assert float(affine_inverse_consistency(A, b, A, b)) > 0.01


def test_decaying_weight_schedule():
    assert decaying_weight(0) == pytest.approx(10 * 4 / 5)
    assert decaying_weight(40) == pytest.approx(40 / (4 + math.exp(10))) and decaying_weight(10) < decaying_weight(5)


def test_map_inverse_consistency():
    idm = identity_map((6, 7, 8), dtype=torch.float64)
    assert float(map_inverse_consistency(idm, idm)) == 0.0
    shifted = idm + 0.05
    assert float(map_inverse_consistency(shifted, idm)) > 1e-3
