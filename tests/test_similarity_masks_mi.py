"""Mutual information and masked similarities against analytic truth and naive loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from avsm.losses.lncc import MKLNCC, Window, _box_sum, box_sum_cumsum
from avsm.losses.mi import (
    MutualInformation,
    _bin_coordinate,
    bspline3,
    entropy,
    joint_histogram,
    mutual_information,
    parzen_weights,
)
from avsm.losses.similarity import MSE, NCC, similarity


def _smooth(shape, coarse, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *coarse, generator=g, dtype=dtype)
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=True)


def _levels_image(counts, seed=0):
    """``(1, 1, 4, 4, N/16)`` image with ``len(counts)`` levels evenly spread over [0, 1], level ``i`` on
    ``counts[i]`` voxels at random positions (``N = Σ counts``, a multiple of 16)."""
    k = len(counts)
    lv = torch.cat([torch.full((c,), i / (k - 1)) for i, c in enumerate(counts)])
    lv = lv[torch.randperm(lv.numel(), generator=torch.Generator().manual_seed(seed))]
    return lv.reshape(1, 1, 4, 4, -1)


# ---------------------------------------------------------------- Parzen histogram


def test_parzen_weights_are_the_cubic_bspline_and_a_partition_of_unity():
    x = torch.rand(2, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    w = parzen_weights(x, lo, hi, 32)
    t = _bin_coordinate(x, lo, hi, 32)
    ref = bspline3(t.unsqueeze(-1) - torch.arange(32, dtype=torch.float64))
    assert torch.allclose(w, ref, atol=1e-14)
    assert torch.allclose(w.sum(-1), torch.ones(2, 500, dtype=torch.float64), atol=1e-14)
    assert float(t.min()) == 1.0 and float(t.max()) == 30.0
    assert bspline3(torch.tensor([0.0, 1.0, 2.0])).tolist() == pytest.approx([2 / 3, 1 / 6, 0.0])


@pytest.mark.parametrize("k", [2, 5, 8])
def test_mi_of_image_with_itself_is_its_level_entropy(k):
    # bins = 31: the range spans 28 bin widths, so the k levels sit on bin centres 28/(k-1) >= 4 apart
    # and their kernels [1/6, 2/3, 1/6] do not overlap.  Then, exactly,
    #   MI(I, I) = log k   and   H(Parzen histogram of I) = log k + H([1/6, 2/3, 1/6]).
    img = _levels_image([64] * k)
    P = joint_histogram(img, img, bins=31)
    mi = float(mutual_information(P)[0])
    h_parzen = float(entropy(P.sum(2), (1,))[0])
    kernel = torch.tensor([1 / 6, 2 / 3, 1 / 6], dtype=torch.float64)
    h_kernel = float(-(kernel * kernel.log()).sum())
    assert float(P.sum()) == pytest.approx(1.0, abs=1e-6)
    assert mi == pytest.approx(math.log(k), abs=2e-6)
    assert h_parzen == pytest.approx(math.log(k) + h_kernel, abs=2e-6)
    assert float(-MutualInformation(bins=31)(img, img)) == pytest.approx(math.log(k), abs=2e-6)


def test_mi_of_image_with_itself_unequal_levels_and_default_bins():
    # levels not on bin centres (bins 32): still MI(I, I) = H(level probabilities), any alignment
    counts = [256, 128, 64, 64]
    img = _levels_image(counts)
    p = torch.tensor(counts, dtype=torch.float64) / 512
    h_levels = float(-(p * p.log()).sum())
    mi = float(-MutualInformation()(img, img))
    assert mi == pytest.approx(h_levels, abs=2e-6)
    # for a continuous image, MI(I, I) is below the Parzen entropy (the kernel blurs the joint)
    smooth = _smooth((12, 12, 12), (4, 4, 4), 0).float()
    P = joint_histogram(smooth, smooth)
    assert float(mutual_information(P)[0]) < float(entropy(P.sum(2), (1,))[0]) - 0.3


def test_mi_monotone_remap_invariance_where_lncc_and_ncc_are_not():
    J = _smooth((24, 24, 24), (6, 6, 6), 1)
    J = (J - J.min()) / (J.max() - J.min())
    noise = 0.02 * torch.randn(J.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    I = (J + noise).clamp(0, 1)
    mi, lncc, ncc = MutualInformation(), MKLNCC(), NCC()
    base = float(-mi(I, J))
    assert base > 1.0
    # exact invariance to a decreasing affine map (the bins are mirrored)
    assert float(-mi(1.0 - I, J)) == pytest.approx(base, rel=1e-6)
    assert float(-mi(3.0 * I + 2.0, J)) == pytest.approx(base, rel=1e-6)
    # non-linear monotone I -> I²: MI within 5 % (measured 3.2 %: only the Parzen bin resolution changes)
    assert float(-mi(I * I, J)) == pytest.approx(base, rel=0.05)
    # ... while mk-LNCC and NCC losses grow by more than 2x (measured 0.017 -> 0.053, 0.0074 -> 0.030)
    assert float(lncc(I * I, J)) > 2.0 * float(lncc(I, J)) + 0.02
    assert float(ncc(I * I, J)) > 2.0 * float(ncc(I, J)) + 0.01


def test_mi_of_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 32, 32, 32, generator=g)
    b = torch.rand(1, 1, 32, 32, 32, generator=g)
    mi = MutualInformation()
    # plug-in bias ~ (bins-1)²/(2N) = 0.015 nats, less with the Parzen smoothing (measured 0.0027)
    assert 0.0 <= float(-mi(a, b)) < 0.01
    assert float(-mi(a + 0.3 * b, a)) > 0.5
    assert float(-mi(a, a)) > 2.0


def test_nmi_option():
    a = _smooth((10, 10, 10), (4, 4, 4), 0)
    b = torch.rand(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    nmi = MutualInformation(normalized=True)
    P = joint_histogram(a, a)
    h = entropy(P.sum(2), (1,))
    assert float(-nmi(a, a)) == pytest.approx(float(2 * h[0] / entropy(P, (1, 2))[0]), rel=1e-12)
    assert 1.0 <= float(-nmi(a, b)) < float(-nmi(a, a)) <= 2.0


def test_mi_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    I = (0.05 + 0.9 * torch.rand(1, 1, 3, 3, 4, dtype=torch.float64, generator=g)).requires_grad_(True)
    J = 0.05 + 0.9 * torch.rand(1, 1, 3, 3, 4, dtype=torch.float64, generator=g)
    w = (0.1 + 0.9 * torch.rand(1, 1, 3, 3, 4, dtype=torch.float64, generator=g)).requires_grad_(True)
    for normalized in (False, True):
        loss = MutualInformation(bins=8, intensity_range=(0.0, 1.0), normalized=normalized)
        assert torch.autograd.gradcheck(lambda x, ww: loss(x, J, ww), (I, w))
        assert torch.autograd.gradcheck(lambda x, y: loss(x, y), (I, J.clone().requires_grad_(True)))
    # min/max range: pin the two extreme voxels so the (detached) range does not move
    pinned = torch.zeros(1, 1, 3, 3, 4, dtype=torch.bool)
    pinned[0, 0, 0, 0, :2] = True
    ext = torch.tensor([0.0, 1.0], dtype=torch.float64)
    inner = I.detach()[~pinned].clone().requires_grad_(True)

    def f(x):
        full = torch.empty(1, 1, 3, 3, 4, dtype=torch.float64)
        full = full.masked_scatter(pinned, ext).masked_scatter(~pinned, x)
        return MutualInformation(bins=8)(full, J)

    assert torch.autograd.gradcheck(f, (inner,))
    # the min/max range is detached: same gradient as the fixed range equal to the images' min/max
    x = I.detach().clone().requires_grad_(True)
    lo, hi = float(I.detach().min()), float(I.detach().max())
    fixed_range = MutualInformation(bins=8, intensity_range=(lo, hi))
    J2 = J.clone()  # one range for both images: give J the same min/max as I
    J2.view(-1)[0], J2.view(-1)[1] = lo, hi
    (g_mm,) = torch.autograd.grad(MutualInformation(bins=8)(x, J2), x)
    (g_fx,) = torch.autograd.grad(fixed_range(x, J2), x)
    assert torch.allclose(g_mm, g_fx, rtol=1e-10, atol=1e-12)


def _field(shape, coarse, seed, shift=0.0):
    """Smooth random field sampled ``shift`` voxels along W (``f(x − shift)``), exact for any shift."""
    c = torch.rand(1, 1, *coarse, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    D, H, W = shape
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, D, dtype=torch.float64),
                             torch.linspace(-1, 1, H, dtype=torch.float64),
                             (torch.arange(W, dtype=torch.float64) - shift) * 2 / (W - 1) - 1, indexing="ij")
    return F.grid_sample(c, torch.stack([x, y, z], -1)[None], align_corners=True, padding_mode="border")


def _translate_w(img, t):
    """``img(x + t)`` along W (voxels), linear interpolation, border padding."""
    D, H, W = img.shape[2:]
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, D), torch.linspace(-1, 1, H),
                             torch.arange(W, dtype=img.dtype), indexing="ij")
    gx = (x + t) * 2 / (W - 1) - 1
    return F.grid_sample(img, torch.stack([gx, y, z], -1)[None], align_corners=True, padding_mode="border")


def test_mi_recovers_a_multimodal_shift():
    shape, coarse, s = (8, 8, 64), (3, 3, 12), 3.3
    fixed = _field(shape, coarse, 0).float()
    # moving: the same anatomy shifted by s, with a non-monotone intensity map (another "modality")
    moving = ((torch.sin(2 * math.pi * _field(shape, coarse, 0, shift=s)) + 1) / 2).float()
    # NCC at the true shift: 1.94 (anti-correlated intensities), far from its optimum 0
    assert float(NCC()(_translate_w(moving, torch.tensor(s)), fixed)) > 0.5
    t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 40)
    mi = MutualInformation()
    for _ in range(40):
        opt.zero_grad()
        mi(_translate_w(moving, t), fixed).backward()
        opt.step()
        sched.step()
    assert abs(float(t.detach()) - s) < 0.5  # measured error 0.09 voxel


# ---------------------------------------------------------------- sampling, shapes, factory


def test_mi_sampling_is_deterministic_and_close_to_full():
    a = _smooth((16, 16, 16), (5, 5, 5), 0).float()
    b = (a + 0.1 * torch.rand(a.shape, generator=torch.Generator().manual_seed(6))).float()
    full = float(MutualInformation()(a, b))
    l1 = float(MutualInformation(samples=0.5, generator=torch.Generator().manual_seed(7))(a, b))
    l2 = float(MutualInformation(samples=1000, generator=torch.Generator().manual_seed(7))(a, b))
    l1b = float(MutualInformation(samples=0.5, generator=torch.Generator().manual_seed(7))(a, b))
    l3 = float(MutualInformation(samples=0.5, generator=torch.Generator().manual_seed(8))(a, b))
    assert l1 == l1b and l1 != l3 and l1 != full
    assert l1 == pytest.approx(full, abs=0.05) and l2 == pytest.approx(full, abs=0.05)
    assert float(MutualInformation(samples=10**6)(a, b)) == pytest.approx(full, abs=1e-6)
    for bad in (0, 1.5, 0.0, True):
        with pytest.raises((ValueError, TypeError)):
            MutualInformation(samples=bad)


def test_mi_shapes_batch_and_factory():
    a = torch.rand(2, 1, 6, 7, 8, generator=torch.Generator().manual_seed(9))
    b = torch.rand(2, 1, 6, 7, 8, generator=torch.Generator().manual_seed(10))
    per = MutualInformation(reduction="none")(a, b)
    assert per.shape == (2,)
    for i in range(2):
        assert float(per[i]) == pytest.approx(float(MutualInformation()(a[i:i + 1], b[i:i + 1])), abs=1e-6)
    with pytest.raises(ValueError):
        MutualInformation()(a.expand(2, 2, 6, 7, 8), b.expand(2, 2, 6, 7, 8))
    with pytest.raises(ValueError):
        MutualInformation()(a, b, torch.ones(2, 1, 6, 7, 9))
    mod = similarity("mi")
    assert isinstance(mod, MutualInformation)
    assert float(mod(a, b, torch.ones(2, 1, 6, 7, 8))) == pytest.approx(float(mod(a, b)), abs=1e-6)
    for name in ("lncc", "ncc", "mse"):
        assert isinstance(similarity(name), torch.nn.Module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mi_and_masked_losses_on_cuda_match_cpu():
    a = _smooth((12, 13, 14), (4, 4, 4), 0).float()
    b = (a * a + 0.05 * torch.rand(a.shape, generator=torch.Generator().manual_seed(11))).float()
    w = (torch.rand(a.shape, generator=torch.Generator().manual_seed(12)) > 0.3).float()
    for loss in (MutualInformation(), MKLNCC([Window(3, 1.0, 1, 2)]), NCC(), MSE()):
        for ww in (None, w):
            cpu = float(loss(a, b, ww))
            gpu = float(loss(a.cuda(), b.cuda(), None if ww is None else ww.cuda()))
            assert gpu == pytest.approx(cpu, abs=1e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert torch.isfinite(MutualInformation(samples=0.5, generator=g)(a.cuda(), b.cuda()))


# ---------------------------------------------------------------- masks


def _losses():
    return {
        "lncc": MKLNCC([Window(3, 0.4, 1, 1), Window(4, 0.6, 2, 2)]),
        "ncc": NCC(),
        "mse": MSE(),
        "mi": MutualInformation(),
        "nmi": MutualInformation(normalized=True, bins=16),
    }


@pytest.mark.parametrize("name", ["lncc", "ncc", "mse", "mi", "nmi"])
def test_masked_losses_ignore_outside_voxels(name):
    loss = _losses()[name]
    shape = (1, 1, 10, 11, 12)
    g = torch.Generator().manual_seed(13)
    fixed = _smooth(shape[2:], (4, 4, 4), 0).float()
    warped0 = (0.7 * fixed + 0.3 * torch.rand(shape, generator=g)).float()
    w = torch.zeros(shape)
    w[..., 2:8, 1:9, 3:11] = 1.0
    w[..., 2:8, 1:9, 3] = 0.5  # a soft rim
    outside = w == 0

    def value_and_grad(warped, fix):
        x = warped.clone().requires_grad_(True)
        val = loss(x, fix, w)
        (gx,) = torch.autograd.grad(val, x)
        return val.detach(), gx

    v0, g0 = value_and_grad(warped0, fixed)
    assert torch.all(g0[outside] == 0) and g0[~outside].abs().max() > 0
    # change the intensities outside the mask (both images, also beyond the inside range)
    warped1 = torch.where(outside, 5.0 * torch.rand(shape, generator=g) - 2.0, warped0)
    fixed1 = torch.where(outside, torch.rand(shape, generator=g), fixed)
    v1, g1 = value_and_grad(warped1, fixed1)
    assert torch.equal(v0, v1) and torch.equal(g0, g1)
    # without the mask, the same change does matter
    assert float(loss(warped1, fixed1)) != pytest.approx(float(loss(warped0, fixed)), abs=1e-4)
    # inside changes matter
    bump = torch.zeros(shape)
    bump[..., 4:6, 3:6, 5:9] = 0.3
    v2, _ = value_and_grad(warped0 + bump, fixed)
    assert abs(float(v2) - float(v0)) > 1e-4


@pytest.mark.parametrize("name", ["lncc", "ncc", "mse", "mi", "nmi"])
def test_weight_of_ones_equals_unweighted(name):
    loss = _losses()[name]
    shape = (2, 1, 9, 10, 11)
    fixed = torch.cat([_smooth(shape[2:], (4, 4, 4), s) for s in (0, 1)]).float()
    warped = (0.5 * fixed + 0.5 * torch.rand(shape, generator=torch.Generator().manual_seed(14))).float()
    ref = float(loss(warped, fixed))
    assert float(loss(warped, fixed, torch.ones(shape))) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert float(loss(warped, fixed, torch.ones(1, *shape[1:]))) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # a non-trivial weight changes the result
    half = torch.ones(shape)
    half[..., :5, :, :] = 0.0
    assert float(loss(warped, fixed, half)) != pytest.approx(ref, rel=1e-3, abs=1e-4)


def _naive_masked_mklncc(I, J, w, windows):
    total = 0.0
    for win in windows:
        ext = (win.size - 1) * win.dilation + 1
        out = [(n - ext) // win.stride + 1 for n in I.shape]
        num = den = 0.0
        for a, b, c in itertools.product(*[range(n) for n in out]):
            sl = tuple(slice(p * win.stride, p * win.stride + ext, win.dilation) for p in (a, b, c))
            x, y, v = I[sl].flatten(), J[sl].flatten(), w[sl].flatten()
            sw = float(v.sum())
            if sw == 0.0:
                continue  # a window without mask weight is ignored
            mx, my = (v * x).sum() / sw, (v * y).sum() / sw
            cov = (v * (x - mx) * (y - my)).sum()
            vx, vy = (v * (x - mx) ** 2).sum(), (v * (y - my) ** 2).sum()
            num += sw * float(cov * cov / (vx * vy + 1e-5))
            den += sw
        total += win.weight * (1.0 - num / den)
    return total


@pytest.mark.parametrize("box", ["conv", "cumsum"])
def test_masked_mklncc_matches_naive_window_loop(box):
    shape = (9, 10, 11)
    g = torch.Generator().manual_seed(15)
    I = torch.rand(1, 1, *shape, dtype=torch.float64, generator=g)
    J = 0.5 * I + 0.3 * torch.rand(1, 1, *shape, dtype=torch.float64, generator=g)
    w = torch.rand(1, 1, *shape, dtype=torch.float64, generator=g)
    w[..., :6, :6, :] = 0.0  # whole windows without weight
    windows = [Window(3, 0.4, 2, 2), Window(2, 0.6, 1, 3)]
    fast = float(MKLNCC(windows, box=box)(I, J, w))
    assert fast == pytest.approx(_naive_masked_mklncc(I[0, 0], J[0, 0], w[0, 0], windows), rel=1e-9)
    # the unweighted cumsum loss equals the conv one as well
    assert float(MKLNCC(windows, box=box)(I, J)) == pytest.approx(float(MKLNCC(windows)(I, J)), rel=1e-12)


def test_masked_mklncc_gradcheck():
    g = torch.Generator().manual_seed(17)
    I = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    J = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, generator=g)
    w = (0.1 + 0.9 * torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, generator=g)).requires_grad_(True)
    loss = MKLNCC([Window(3, 1.0, 1, 2)])
    assert torch.autograd.gradcheck(lambda x, ww: loss(x, J, ww), (I, w))


def test_cumsum_box_sum_equals_conv_box_sum():
    x = torch.rand(2, 1, 13, 17, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    for win in (Window(3, 1, 1, 1), Window(3, 1, 2, 2), Window(4, 1, 3, 3), Window(5, 1, 2, 1), Window(2, 1, 1, 5)):
        a, b = _box_sum(x, win), box_sum_cumsum(x, win)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
