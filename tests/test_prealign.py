"""Pre-aligned training pairs (composed template affines, one resampling) and distillation targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avsm.core.coords import affine_map, affine_on_map, compose_affine, identity_map, invert_affine
from avsm.core.sampling import gaussian_blur, warp
from avsm.losses.distill import map_distance_vox
from avsm.models.avsm import AVSM, AVSMConfig
from avsm.train.augment import AugmentConfig
from avsm.train.data import CohortVolume
from avsm.train.prealign import (
    AlignConfig,
    AlignedPairs,
    distillation_config,
    distillation_target,
    pair_affine,
    template_affine,
    template_affines,
)

SHAPE = (48, 48, 48)


def _head(shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """A smooth asymmetric 'head': an ellipsoid with two inner structures, blurred (1, 1, D, H, W)."""
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    img = torch.zeros(shape)
    img[(((z - 0.5) / 0.3) ** 2 + ((y - 0.48) / 0.36) ** 2 + ((x - 0.52) / 0.27) ** 2) < 1] = 0.4
    img[(((z - 0.58) / 0.12) ** 2 + ((y - 0.48) / 0.2) ** 2 + ((x - 0.6) / 0.1) ** 2) < 1] = 1.0
    img[(((z - 0.4) / 0.1) ** 2 + ((y - 0.38) / 0.12) ** 2 + ((x - 0.47) / 0.1) ** 2) < 1] = 0.7
    return gaussian_blur(img[None, None], (1.0, 1.0, 1.0)).clamp(0, 1)


def _affine(rot: tuple[float, float, float], scale: tuple[float, float, float], t: tuple[float, float, float]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    a = [math.radians(r) for r in rot]
    Rz = torch.tensor([[math.cos(a[0]), -math.sin(a[0]), 0], [math.sin(a[0]), math.cos(a[0]), 0], [0, 0, 1]])
    Rx = torch.tensor([[1, 0, 0], [0, math.cos(a[1]), -math.sin(a[1])], [0, math.sin(a[1]), math.cos(a[1])]])
    A = (Rz @ Rx @ torch.diag(torch.tensor(scale))).float()[None]
    return A, torch.tensor(t).float()[None]


def _u2w(shape: tuple[int, ...] = SHAPE, mm: float = 4.0) -> np.ndarray:
    return np.diag([mm * (s - 1) for s in reversed(shape)] + [1.0])


def _subject(sid: str, template: torch.Tensor, C: tuple[torch.Tensor, torch.Tensor]) -> CohortVolume:
    """The template seen through the pull-back ``C`` (subject unit → template unit): its true
    template → subject affine is ``C⁻¹``."""
    img = warp(template, affine_map(C[0], C[1], SHAPE))
    lab = (img > 0.3).to(torch.int16) + (img > 0.8).to(torch.int16)
    return CohortVolume(sid, img, img * (lab >= 1), lab, _u2w())


def test_affine_on_map_is_the_affine_and_composes_like_the_matrix_product() -> None:
    A1, b1 = _affine((10, -5, 0), (1.1, 0.9, 1.0), (0.02, -0.03, 0.01))
    A2, b2 = _affine((-4, 8, 0), (0.95, 1.05, 1.1), (-0.01, 0.02, 0.04))
    idm = identity_map((6, 7, 8))
    torch.testing.assert_close(affine_on_map(A1, b1, idm), affine_map(A1, b1, (6, 7, 8)), atol=1e-6, rtol=0)
    A, b = compose_affine(A2, b2, A1, b1)
    torch.testing.assert_close(affine_on_map(A2, b2, affine_on_map(A1, b1, idm)), affine_map(A, b, (6, 7, 8)),
                               atol=1e-6, rtol=0)
    # pair_affine(T_i, T_j) = T_i ∘ T_j⁻¹: a pair of one subject with itself is the identity
    torch.testing.assert_close(pair_affine((A1, b1), (A1, b1))[0], torch.eye(3)[None], atol=1e-6, rtol=0)
    Ai, bi = invert_affine(A2.double(), b2.double())
    Ac, bc = compose_affine(A1.double(), b1.double(), Ai, bi)
    torch.testing.assert_close(pair_affine((A1, b1), (A2, b2)), (Ac.float(), bc.float()), atol=1e-6, rtol=0)


def test_a_pair_prealigned_by_composed_template_affines_equals_one_aligned_directly() -> None:
    """Two subjects made from a template by known affines: each registered once to the template,
    the composed pair affine ``T_i ∘ T_j⁻¹`` recovers the true pair transform, and equals affine-opt
    run directly on the pair, both within 0.5 voxel (mean, inside the head) and 1.5 voxels (max)."""
    tpl = _head()
    Ci = _affine((8, -6, 0), (1.08, 0.95, 1.0), (0.03, -0.02, 0.02))
    Cj = _affine((-5, 4, 0), (0.94, 1.04, 1.06), (-0.02, 0.03, -0.01))
    si, sj = _subject("i", tpl, Ci), _subject("j", tpl, Cj)
    T = template_affines([si, sj], tpl, _u2w())
    composed = pair_affine(T[0], T[1])
    true = pair_affine(invert_affine(*Ci), invert_affine(*Cj))
    direct = template_affine(si.whole, si.unit_to_world, sj.whole, sj.unit_to_world)  # i → j directly
    vox = torch.tensor([s - 1.0 for s in SHAPE]).view(1, 3, 1, 1, 1)
    inside = (sj.whole[0, 0] > 0.2)

    def err(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        d = ((affine_map(*a, SHAPE) - affine_map(*b, SHAPE)) * vox).norm(dim=1)[0][inside]
        return float(d.mean()), float(d.max())

    moved = err(true, (torch.eye(3)[None], torch.zeros(1, 3)))
    assert moved[0] > 3.0  # the pair is far from aligned to start with
    for a, b in ((composed, true), (composed, direct), (direct, true)):
        mean, mx = err(a, b)
        assert mean < 0.5 and mx < 1.5, (mean, mx)


def test_aligned_pairs_resample_each_image_once_through_the_composed_map() -> None:
    tpl = _head()
    vols = [_subject(f"s{k}", tpl, _affine((4 * k, -3 * k, 0), (1 + 0.03 * k,) * 3, (0.01 * k, 0, 0)))
            for k in range(3)]
    affines = [invert_affine(*_affine((4 * k, -3 * k, 0), (1 + 0.03 * k,) * 3, (0.01 * k, 0, 0))) for k in range(3)]
    cfg = AlignConfig(shared=AugmentConfig(p_intensity=0.0, warp_amplitude=0.03), p_strip=0.0)
    ds = AlignedPairs(vols, affines, 6, seed=3, config=cfg, return_maps=True)
    item = ds[2]
    i, j = item["pair"].tolist()
    assert i != j
    # one resampling of each original through the map the item reports
    torch.testing.assert_close(item["moving"][None], warp(vols[i].whole, item["moving_map"][None]))
    torch.testing.assert_close(item["fixed"][None], warp(vols[j].whole, item["fixed_map"][None]))
    # the moving map is an exact affine function of the fixed map (ρ ∘ T_i ∘ T_j⁻¹ ∘ ψ), close to T_i ∘ T_j⁻¹
    X = torch.cat([item["fixed_map"].reshape(3, -1).T - 0.5, torch.ones(math.prod(SHAPE), 1)], 1).double()
    Y = (item["moving_map"].reshape(3, -1).T - 0.5).double()
    sol = torch.linalg.lstsq(X, Y).solution
    assert float((X @ sol - Y).abs().max()) < 1e-5
    A_pair, _ = pair_affine(affines[i], affines[j])
    assert float((sol[:3].T.float() - A_pair[0]).abs().max()) < 0.12  # the residual ρ is small
    assert not torch.allclose(item["fixed_map"], identity_map(SHAPE)[0], atol=1e-3)  # ψ is not the identity
    # deterministic; without augmentation the pair is exactly the composed template affines
    torch.testing.assert_close(ds[2]["moving"], item["moving"], atol=0, rtol=0)
    plain = AlignedPairs(vols, affines, 2, seed=3, augment=False)[0]
    i, j = plain["pair"].tolist()
    # the true template affines align the two subjects: the moving image becomes the fixed one
    head = vols[j].whole[0] > 0.2
    aligned = float((plain["moving"] - plain["fixed"]).abs()[head].mean())
    unaligned = float((vols[i].whole[0] - vols[j].whole[0]).abs()[head].mean())
    assert aligned < 0.2 * unaligned, (aligned, unaligned)


def _deformed_pair(shape: tuple[int, int, int] = (32, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    fixed = _head(shape)
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    bump = 0.04 * torch.exp(-(((z - 0.5) ** 2 + (y - 0.5) ** 2 + (x - 0.55) ** 2) / 0.03))
    phi = identity_map(shape).clone()
    phi[0, 2] += bump
    phi[0, 0] -= 0.5 * bump
    return warp(fixed, phi), fixed


@pytest.mark.parametrize("integrator", ["ss", "rk4"])
def test_distillation_targets_round_trip_through_the_networks_vsvf(integrator: str) -> None:
    """vSVF-opt's momentum on the network's grid, integrated by the network's own VSVF, is opt's map
    (scaling and squaring, and the bundled model's RK4 with its CFL clamp)."""
    moving, fixed = _deformed_pair()
    mc = AVSMConfig(unet_base=4, integrator=integrator, sigmas=(0.04, 0.08), amp=False)
    cfg = distillation_config(mc, lncc_windows=(5,), iterations=(20, 20))
    mom, phi = distillation_target(moving, fixed, cfg)
    model = AVSM(mc)
    vs = model.vsvf_for(fixed.shape[2:])
    assert tuple(mom.shape[2:]) == vs.low_shape  # the network's momentum grid
    again = vs(mom, identity_map(fixed.shape[2:])).phi
    torch.testing.assert_close(again, phi, atol=1e-5, rtol=0)
    assert float(map_distance_vox(phi, identity_map(fixed.shape[2:]))) > 0.05  # opt moved the map
    assert float(map_distance_vox(again, phi)) < 1e-8
    with pytest.raises(ValueError, match="kernel weights"):
        distillation_config(AVSMConfig(sigmas=(0.04, 0.08), sigma_weights=(0.5, 0.5)))


def test_a_network_trained_to_zero_distillation_loss_reproduces_opts_map() -> None:
    """The supervised term alone, on one pair: the term is the map distance itself, so as it goes to
    zero the network's map becomes opt's; 300 Adam steps take it from 100 % (the untrained network
    returns the identity) to below 10 % of the distance the target moved."""
    torch.manual_seed(0)
    moving, fixed = _deformed_pair()
    mc = AVSMConfig(unet_base=4, integrator="ss", sigmas=(0.04, 0.08), amp=False, vsvf_steps_train=1)
    _, target = distillation_target(moving, fixed, distillation_config(mc, lncc_windows=(5,), iterations=(20, 20)))
    model = AVSM(mc)
    model.freeze_affine(True)
    opt = torch.optim.Adam(model.momentum.parameters(), lr=2e-3)
    start = float(map_distance_vox(identity_map(fixed.shape[2:]), target))
    for _ in range(300):
        out = model(moving, fixed, affine_steps=0, vsvf_steps=1)
        opt.zero_grad()
        map_distance_vox(out.phi, target).mean().backward()
        opt.step()
    with torch.no_grad():
        final = float(map_distance_vox(model(moving, fixed, affine_steps=0, vsvf_steps=1).phi, target))
        # the trainer's loss carries the same term, weighted, on top of the paper's unsupervised loss
        terms = model.training_loss(moving, fixed, stage="vsvf", affine_steps=0, vsvf_steps=1, symmetric=False,
                                    target_map=target, distill_weight=3.0)
    assert final < 0.1 * start, (final, start)
    assert float(terms["distill"]) == pytest.approx(final, rel=1e-4)
    unsupervised = terms["sim"] + mc.lambda_vr * terms["reg"]
    assert float(terms["total"]) == pytest.approx(float(unsupervised) + 3.0 * final, rel=1e-5)


def test_distill_pairs_compute_targets_once_and_draw_them_per_epoch(tmp_path, monkeypatch) -> None:
    import avsm.train.prealign as prealign
    from avsm.train.prealign import DistillPairs

    tpl = _head()
    vols = [_subject(f"s{k}", tpl, _affine((3 * k, 0, 0), (1.0,) * 3, (0.01 * k, 0, 0))) for k in range(3)]
    affines = [invert_affine(*_affine((3 * k, 0, 0), (1.0,) * 3, (0.01 * k, 0, 0))) for k in range(3)]
    cfg = distillation_config(AVSMConfig(integrator="ss"), lncc_windows=(5,), iterations=(2, 2))
    ds = DistillPairs(AlignedPairs(vols, affines, 4, seed=1, augment=False), 3, cfg, cache=tmp_path)
    ds.prepare()
    assert len(list(tmp_path.glob("distill_*.npz"))) == 3
    again = DistillPairs(AlignedPairs(vols, affines, 4, seed=1, augment=False), 3, cfg, cache=tmp_path)

    def no_recompute(*a: object, **k: object) -> None:
        raise AssertionError("the cached target was recomputed")

    monkeypatch.setattr(prealign, "distillation_target", no_recompute)
    item, cached = ds._item(1), again._item(1)  # the second reads the cache
    torch.testing.assert_close(item["target_map"], cached["target_map"], atol=0, rtol=0)
    assert item["target_map"].shape == (3, *SHAPE) and item["source"] == "distill"
    drawn = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        drawn.append(tuple(int(ds[i]["pair"][0] * 10 + ds[i]["pair"][1]) for i in range(4)))
    assert len(set(drawn)) > 1  # each epoch draws its own pairs among the fixed ones
    # another template affine (so other images) never reads these targets
    other = [invert_affine(*_affine((5 * k, 2, 0), (1.0,) * 3, (0.0, 0.01 * k, 0))) for k in range(3)]
    with pytest.raises(AssertionError, match="recomputed"):
        DistillPairs(AlignedPairs(vols, other, 4, seed=1, augment=False), 3, cfg, cache=tmp_path)._item(1)


def test_implausible_template_affines_are_recognised() -> None:
    from avsm.train.prealign import decompose_mm, plausible_affine

    u2w_s, u2w_t = _u2w(mm=1.0), _u2w(mm=1.2)
    A, b = _affine((20, 0, 0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    # a 20° rotation between grids of 1 and 1.2 mm: in millimetres a rotation and a uniform 1/1.2 scale
    angle, ls, shear = decompose_mm(A * 1.2, u2w_s, u2w_t)
    assert angle == pytest.approx(20.0, abs=1e-3) and np.allclose(ls, 0.0, atol=1e-6) and shear < 1e-6
    assert plausible_affine((A * 1.2, b), u2w_s, u2w_t)
    assert not plausible_affine(_affine((40, 0, 0), (1.2,) * 3, (0, 0, 0)), u2w_s, u2w_t)  # rotation
    assert not plausible_affine(_affine((0, 0, 0), (1.2, 1.2, 2.0), (0, 0, 0)), u2w_s, u2w_t)  # scale e^0.51
    flip = torch.diag(torch.tensor([-1.2, 1.2, 1.2]))[None]
    assert not plausible_affine((flip, b), u2w_s, u2w_t)  # a reflection


def test_mixture_refuses_pre_aligned_sources_beside_posed_ones() -> None:
    from avsm.errors import AvsmError
    from avsm.train.mixture import build_mixture

    with pytest.raises(AvsmError, match="cannot be mixed"):
        build_mixture({"ixi": 0.5, "ixi-aligned": 0.5}, "nowhere", 4.2, 4)
    with pytest.raises(AvsmError, match="two runs"):
        build_mixture({"distill": 0.5, "ixi-aligned": 0.5}, "nowhere", 4.2, 4)
