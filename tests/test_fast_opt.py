"""The fast vSVF-opt: optimisers, stopping rule, presets and the settings object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from avsm.api import prepare_pair, register
from avsm.core.coords import affine_map
from avsm.errors import AvsmError
from avsm.io.image import Volume, load_image
from avsm.optim.stopping import RelativeChangeStop
from avsm.optim.vsvf_opt import OPTIMIZERS, VSVFOptConfig, optimise_vsvf
from avsm.settings import PRESETS, RegistrationSettings, preset

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def small_pair():
    fixed = load_image(DATA / "mni_4mm.nii.gz")
    moving = load_image(DATA / "colin_4mm.nii.gz")
    return prepare_pair(fixed, moving, spacing=4.0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("integrator", ["ss", "rk4"])
def test_each_optimiser_decreases_the_energy(small_pair, optimizer: str, integrator: str) -> None:
    p = small_pair
    phi0 = affine_map(p.A0, p.b0, p.fixed_grid.shape)
    lr = 0.01 if optimizer == "adam" else 0.5 if optimizer == "lbfgs-nols" else 1.0
    cfg = VSVFOptConfig(scales=(1.0,), iterations=(8,), optimizer=optimizer, lr=lr, integrator=integrator,
                        time_steps=5)
    res = optimise_vsvf(p.fixed_t, p.moving_t, phi0, cfg, progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1e-3, losses
    # line search costs extra evaluations; the others use exactly one per iteration
    if optimizer == "lbfgs":
        assert res.evaluations[0] > 8
    else:
        assert res.evaluations == [8]


def test_stopping_rule_on_sequences() -> None:
    stop = RelativeChangeStop(1e-3, window=3)
    falling = [1.0 - 0.05 * k for k in range(10)]
    assert not any(stop.update(e) for e in falling)
    stop = RelativeChangeStop(1e-3, window=3)
    flat = [0.5, 0.4, 0.3] + [0.3 - 1e-6 * k for k in range(10)]
    hits = [stop.update(e) for e in flat]
    assert True in hits and hits.index(True) == 5  # 3 iterations after the plateau begins
    never = RelativeChangeStop(0.0, window=1)
    assert not any(never.update(0.1) for _ in range(20))
    with pytest.raises(ValueError):
        RelativeChangeStop(-1.0)


def test_stopping_rule_stops_a_converged_pair(small_pair) -> None:
    """Registering an image to itself: the energy is flat from the start, so the level stops early."""
    p = small_pair
    phi0 = affine_map(p.A0, p.b0, p.fixed_grid.shape)
    cfg = VSVFOptConfig(scales=(1.0,), iterations=(50,), optimizer="lbfgs-nols", lr=0.5, integrator="ss",
                        tol=1e-3, window=3)
    res = optimise_vsvf(p.fixed_t, p.fixed_t, _identity(phi0), cfg, progress=False)
    assert len(res.history) < 10
    # the same level without the rule runs its whole budget
    res2 = optimise_vsvf(p.fixed_t, p.fixed_t, _identity(phi0), dataclasses.replace(cfg, tol=0.0,
                                                                                   iterations=(12,)),
                         progress=False)
    assert len(res2.history) == 12


def _identity(phi: torch.Tensor) -> torch.Tensor:
    from avsm.core.coords import identity_map

    return identity_map(phi.shape[2:])


def test_fast_preset_recovers_a_known_random_affine() -> None:
    """The fast preset's affine stage recovers the registration test's known affine within its bound."""
    from test_registration import _random_affine as random_affine_transform  # the same known affines

    fixed_img = sitk.ReadImage(str(DATA / "colin_4mm.nii.gz"), sitk.sitkFloat32)
    for seed in (0, 1):
        T = random_affine_transform(seed, fixed_img)
        moving_img = sitk.Resample(fixed_img, fixed_img, T, sitk.sitkLinear, 0.0)
        res = register(fixed=Volume.from_sitk(fixed_img), moving=Volume.from_sitk(moving_img),
                       settings=preset("fast", method="affine"), progress=False)
        wm = res.world_map()[0].numpy().reshape(3, -1).T
        arr = sitk.GetArrayFromImage(fixed_img)
        idx = np.argwhere(arr > 20)[::7]
        pts = [fixed_img.TransformIndexToPhysicalPoint(tuple(int(v) for v in i[::-1])) for i in idx]
        truth = np.array([T.GetInverse().TransformPoint(q) for q in pts])
        flat = np.ravel_multi_index(idx.T, arr.shape)
        err = np.linalg.norm(wm[flat] - truth, axis=1)
        assert err.mean() < 1.0, (seed, err.mean())  # mm on 4 mm voxels, as the paper schedule's test
        assert np.percentile(err, 99) < 2.5


def test_paper_preset_is_the_papers_schedule() -> None:
    p = preset("paper")
    assert p.affine.scales == (0.25, 0.5, 1.0) and p.affine.iterations == (200, 200, 50)
    assert p.vsvf.iterations == (60, 60, 60) and p.vsvf.optimizer == "lbfgs"
    assert p.vsvf.integrator == "rk4" and p.vsvf.time_steps == 10 and p.vsvf.reg_weight == 10.0
    assert p.vsvf.sigmas == (0.05, 0.10, 0.15, 0.20, 0.25)
    f = preset("fast")
    assert f.vsvf.integrator == "ss" and f.vsvf.iterations[-1] == 0
    assert set(PRESETS) == {"native", "fast", "paper"}
    assert RegistrationSettings().preset == "fast" and RegistrationSettings().method == "auto"


def test_settings_validate_and_copy() -> None:
    s = preset("fast")
    t = s.replace(similarity="mi", device="cpu")
    assert t.affine.similarity == "mi" and t.vsvf.similarity == "mi" and t.refine.similarity == "mi"
    assert s.vsvf.similarity == "lncc"  # the original is untouched
    for bad in ({"method": "syn"}, {"similarity": "cc"}, {"init": "/no/such/file.mat"}, {"spacing": -1.0},
                {"device": "tpu"}, {"colour": 1}):
        with pytest.raises(AvsmError):
            s.replace(**bad)
    with pytest.raises(AvsmError):
        preset("slow")
    with pytest.raises(ValueError):
        VSVFOptConfig(optimizer="sgd")
    with pytest.raises(ValueError):
        VSVFOptConfig(scales=(0.5, 1.0), iterations=(10,))


def test_auto_method_picks_opt_for_every_input() -> None:
    """bench_cohort.py: opt is the most accurate method within SyN's time on real brains too."""
    from avsm.api import choose_method

    brain = load_image(DATA / "mni_4mm.nii.gz")
    s = preset("fast")
    assert choose_method(brain, brain, s)[0] == "opt"
    assert choose_method(brain, brain, s.replace(transform="rigid"))[0] == "opt"
    ct = brain.with_array(np.where(brain.array > 0, 40.0, -1000.0).astype(np.float32))
    assert choose_method(ct, ct, s)[0] == "opt"
    g = brain.grid
    small = type(g)(g.shape, tuple(sp * 0.3 for sp in g.spacing), g.origin, g.direction)  # a 60 mm box
    assert choose_method(Volume(brain.array, small), brain, s)[0] == "opt"


def test_own_optimisers_match_torch_optim() -> None:
    """avsm.optim.optimizers compute the iterates of torch.optim.Adam (+ cosine schedule) and of
    torch.optim.LBFGS(max_iter=1, no line search), on a non-quadratic problem, in float64."""
    from avsm.optim.optimizers import LBFGS, Adam, cosine_lr

    g = torch.Generator().manual_seed(3)
    Q = torch.randn(6, 6, generator=g, dtype=torch.float64)
    Q = Q @ Q.T + torch.eye(6, dtype=torch.float64)
    c = torch.randn(6, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ Q @ x - c @ x + 0.1 * (x ** 4).sum()

    x0 = torch.randn(6, generator=g, dtype=torch.float64)
    for make_ours, make_torch, sched in (
        (lambda p: LBFGS([p], lr=0.5, history_size=5),
         lambda p: torch.optim.LBFGS([p], lr=0.5, max_iter=1, history_size=5, line_search_fn=None,
                                     tolerance_grad=0.0, tolerance_change=0.0), False),
        (lambda p: Adam([p], lr=0.05), lambda p: torch.optim.Adam([p], lr=0.05), True),
    ):
        a = torch.nn.Parameter(x0.clone())
        b = torch.nn.Parameter(x0.clone())
        ours, ref = make_ours(a), make_torch(b)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=30, eta_min=0.0025) if sched else None
        for it in range(30):
            for p, opt in ((a, ours), (b, ref)):
                def closure(p=p, opt=opt) -> torch.Tensor:
                    opt.zero_grad()
                    loss = f(p)
                    loss.backward()
                    return loss
                opt.step(closure)
            if lr_sched is not None:
                lr_sched.step()
                ours.lr = cosine_lr(0.05, it + 1, 30, 0.0025)
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (type(ours).__name__, it)
        assert f(a) < f(torch.nn.Parameter(x0)) - 0.1  # it did optimise
