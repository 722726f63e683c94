"""Training on the real cohort and synthesised pairs: Dice term, posing + initialisation, mixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avsm.cli.train import parse_sources
from avsm.core.coords import identity_map
from avsm.errors import AvsmError
from avsm.losses.dice import (
    one_hot,
    select_labels,
    shared_labels,
    soft_dice,
    warped_dice_loss,
)
from avsm.models.avsm import AVSM, AVSMConfig
from avsm.train.data import (
    CohortPairs,
    CohortVolume,
    MixedPairs,
    PoseConfig,
    pose_and_initialise,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _blob_labels(shape: tuple[int, int, int], centre: tuple[float, float, float], gen: torch.Generator
                 ) -> torch.Tensor:
    """An ellipsoid 'head' (label 1) with two inner ellipsoids (2, 3), off-centre so that pose matters."""
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    c = torch.tensor(centre) + 0.02 * torch.randn(3, generator=gen)
    lab = torch.zeros(shape, dtype=torch.int64)
    r = ((z - c[0]) / 0.30) ** 2 + ((y - c[1]) / 0.38) ** 2 + ((x - c[2]) / 0.26) ** 2
    lab[r < 1] = 1
    lab[(((z - c[0] - 0.08) / 0.12) ** 2 + ((y - c[1]) / 0.2) ** 2 + ((x - c[2] - 0.08) / 0.1) ** 2) < 1] = 2
    lab[(((z - c[0] + 0.1) / 0.1) ** 2 + ((y - c[1] + 0.1) / 0.12) ** 2 + ((x - c[2] + 0.05) / 0.1) ** 2) < 1] = 3
    return lab[None, None]


def _volume(sid: str, seed: int, shape: tuple[int, int, int] = (32, 32, 32)) -> CohortVolume:
    g = torch.Generator().manual_seed(seed)
    lab = _blob_labels(shape, (0.5, 0.48, 0.52), g)
    img = torch.tensor([0.0, 0.4, 1.0, 0.7])[lab].float()
    brain = img * (lab >= 2)
    u2w = np.diag([2.0 * (s - 1) for s in reversed(shape)] + [1.0])
    return CohortVolume(sid, img, brain, lab.to(torch.int16), u2w)


def _mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    vals = shared_labels(a, b)
    return float(soft_dice(one_hot(a, vals), one_hot(b, vals)).mean())


# --------------------------------------------------------------------------- Dice term


def test_soft_dice_equals_the_formula_and_one_for_identical_masks() -> None:
    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 3, 5, 6, 7, generator=g), (torch.rand(2, 3, 5, 6, 7, generator=g) > 0.5).float()
    naive = torch.empty(2, 3)
    for i in range(2):
        for k in range(3):
            naive[i, k] = 2 * (p[i, k] * t[i, k]).sum() / (p[i, k].sum() + t[i, k].sum())
    assert torch.allclose(soft_dice(p, t, eps=0.0), naive, atol=1e-6)
    assert torch.allclose(soft_dice(t, t), torch.ones(2, 3))


def test_label_selection_takes_shared_non_zero_labels_only() -> None:
    a = torch.tensor([0, 1, 2, 3, 5, 9])[None, None, None, None]
    b = torch.tensor([0, 2, 3, 4, 9, 9])[None, None, None, None]
    assert shared_labels(a, b).tolist() == [2, 3, 9]
    g = torch.Generator().manual_seed(1)
    sub = select_labels(a, b, 2, g)
    assert sub.numel() == 2 and set(sub.tolist()) <= {2, 3, 9} and sub.tolist() == sorted(sub.tolist())
    assert select_labels(a, b, 10).tolist() == [2, 3, 9]


def test_warped_dice_loss_is_zero_at_alignment_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(2)
    lab = _blob_labels((24, 24, 24), (0.5, 0.5, 0.5), g)
    phi = identity_map((24, 24, 24))
    assert float(warped_dice_loss(lab, lab, phi)) < 1e-4
    shifted = phi.clone()
    shifted[:, 2] += 0.08
    far = phi.clone()
    far[:, 2] += 0.2
    l1, l2 = float(warped_dice_loss(lab, lab, shifted)), float(warped_dice_loss(lab, lab, far))
    assert 0.05 < l1 < l2
    # no shared label: 0 and no gradient
    assert float(warped_dice_loss(lab, torch.zeros_like(lab), phi)) == 0.0


def test_warped_dice_gradient_matches_finite_differences_float64() -> None:
    g = torch.Generator().manual_seed(3)
    lab = _blob_labels((7, 7, 7), (0.5, 0.5, 0.5), g)
    phi = (identity_map((7, 7, 7)).double() + 0.03 * torch.randn(1, 3, 7, 7, 7, generator=g,
                                                                   dtype=torch.float64))

    assert torch.autograd.gradcheck(lambda p: warped_dice_loss(lab, lab, p), (phi.requires_grad_(),),
                                    eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("stage", ["affine", "vsvf"])
def test_training_loss_adds_the_weighted_dice_term(stage: str) -> None:
    torch.manual_seed(0)
    model = AVSM(AVSMConfig(affine_base=4, unet_base=4, affine_depth=3, amp=False))
    g = torch.Generator().manual_seed(4)
    lm = _blob_labels((32, 32, 32), (0.5, 0.5, 0.5), g)
    lf = _blob_labels((32, 32, 32), (0.45, 0.5, 0.55), g)
    m, f = torch.tensor([0.0, 0.4, 1.0, 0.7])[lm].float(), torch.tensor([0.0, 0.4, 1.0, 0.7])[lf].float()
    torch.manual_seed(1)
    plain = model.training_loss(m, f, stage=stage, moving_labels=lm, fixed_labels=lf, dice_weight=0.0)
    torch.manual_seed(1)
    weighted = model.training_loss(m, f, stage=stage, moving_labels=lm, fixed_labels=lf, dice_weight=2.0)
    assert 0.0 < float(plain["dice"]) < 1.0
    assert float(weighted["total"].detach()) == pytest.approx(float(plain["total"].detach()) + 2.0 * float(plain["dice"]), rel=1e-4)
    weighted["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(q).all() for q in grads)
    assert "dice" not in model.training_loss(m, f, stage=stage)


# --------------------------------------------------------------------------- posing and pairs


def test_pose_without_pose_and_header_init_is_the_identity() -> None:
    v = _volume("a", 0)
    g = torch.Generator().manual_seed(0)
    out, lab, chosen = pose_and_initialise(v.whole, v.labels.long(), v.unit_to_world, v.whole, v.unit_to_world, g,
                                           PoseConfig(p_pose=0.0, init="header"))
    assert chosen == "header"
    assert torch.allclose(out, v.whole, atol=1e-5)
    assert torch.equal(lab, v.labels.long())


def test_initialisation_undoes_most_of_a_large_random_pose() -> None:
    """Posed moving images (rotations up to 25°, 15 % scale, 15 % translation) start far from the
    fixed one; the automatic initialisation, as at inference, brings most of them back."""
    v = _volume("a", 0)
    header, auto = [], []
    for k in range(6):
        cfg = PoseConfig(p_pose=1.0, random_strength=False, scale=0.15, shear=0.05)
        _, lh, _ = pose_and_initialise(v.whole, v.labels.long(), v.unit_to_world, v.whole, v.unit_to_world,
                                       torch.Generator().manual_seed(k), PoseConfig(**{**cfg.__dict__, "init": "header"}))
        _, la, _ = pose_and_initialise(v.whole, v.labels.long(), v.unit_to_world, v.whole, v.unit_to_world,
                                       torch.Generator().manual_seed(k), cfg)
        header.append(_mean_dice(lh, v.labels.long()))
        auto.append(_mean_dice(la, v.labels.long()))
    assert np.mean(auto) > np.mean(header) + 0.05, (header, auto)


def test_cohort_pairs_are_cross_subject_deterministic_and_on_the_fixed_grid() -> None:
    vols = [_volume(f"s{k}", k) for k in range(3)]
    ds = CohortPairs(vols, 8, seed=5, pose=PoseConfig(init="com"))
    a, b = ds[3], ds[3]
    assert torch.equal(a["moving"], b["moving"]) and torch.equal(a["moving_labels"], b["moving_labels"])
    i, j = a["pair"].tolist()
    assert i != j
    assert a["moving"].shape == a["fixed"].shape == a["moving_labels"].shape == (1, 32, 32, 32)
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["moving"], a["moving"])
    whole = CohortPairs(vols, 4, strip="whole")[0]
    brain = CohortPairs(vols, 4, strip="brain")[0]
    # the brain variant has no scalp: label-1-only voxels are dark
    assert float(whole["fixed"][whole["fixed_labels"] == 1].mean()) > 0.3
    assert float(brain["fixed"][brain["fixed_labels"] == 1].max()) < 1e-6
    with pytest.raises(ValueError, match="strip"):
        CohortPairs(vols, 4, strip="skull")


class _Const(torch.utils.data.Dataset):
    def __init__(self, value: int) -> None:
        self.value = value
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return self.value


def test_mixture_follows_its_weights_and_is_deterministic() -> None:
    mix = MixedPairs([_Const(0), _Const(1)], [0.75, 0.25], 4000, seed=3)
    draws = [mix[i] for i in range(4000)]
    assert abs(np.mean(draws) - 0.25) < 0.03
    assert draws[:50] == [mix[i] for i in range(50)]
    mix.set_epoch(2)
    assert mix.sources[0].epoch == 2
    assert [mix[i] for i in range(50)] != draws[:50]
    with pytest.raises(ValueError):
        MixedPairs([_Const(0)], [0.0], 4)


def test_parse_sources() -> None:
    assert parse_sources("ixi=0.6, synthseg=0.4") == {"ixi": 0.6, "synthseg": 0.4}
    assert parse_sources("") == {}
    with pytest.raises(AvsmError, match="NAME=WEIGHT"):
        parse_sources("ixi")
    from avsm.train.mixture import build_mixture

    with pytest.raises(AvsmError, match="unknown training source"):
        build_mixture({"oasis": 1.0}, SHARED, 4.2, 4)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED / "ixi185").is_dir(), reason="needs ../shared/data/ixi185 (real IXI cohort)")
def test_real_subject_preparation_and_the_held_out_split(tmp_path: Path) -> None:
    from avsm.train.cohort import ixi_subjects, split_held_out, split_subjects
    from avsm.train.data import prepare_cohort
    from avsm.train.mixture import training_subjects

    subs = ixi_subjects(SHARED / "ixi185")
    train, held = split_subjects(subs)
    val, test = split_held_out(held)
    assert {s.id for s in training_subjects(SHARED)} == {s.id for s in train}
    assert not {s.id for s in train} & {s.id for s in held}
    assert not {s.id for s in val} & {s.id for s in test} and len(val) + len(test) == len(held)
    v = prepare_cohort(train[:1], 4.2, tmp_path)[0]
    again = prepare_cohort(train[:1], 4.2, tmp_path)[0]  # from the cache
    assert torch.equal(v.whole, again.whole) and torch.equal(v.labels, again.labels)
    assert v.whole.shape == v.brain.shape == v.labels.shape and v.labels.dtype == torch.int16
    assert -0.01 <= float(v.whole.min()) and float(v.whole.max()) <= 1.01  # recursive-Gaussian overshoot
    inside = v.labels > 0
    # stripping removes the scalp: non-brain voxels of the stripped image are (nearly) empty
    assert float(v.brain[~inside].mean()) < 0.2 * float(v.whole[~inside].mean())
    assert float(v.brain[inside].mean()) > 0.2


# --------------------------------------------------------------------------- network affine from affine-opt


def test_network_affine_opt_uses_the_affine_opt_result() -> None:
    """``network_affine='opt'``: the network's vSVF steps start from exactly the affine of ``opt``."""
    from avsm.api import register
    from avsm.data import demo_paths
    from avsm.io.image import load_image
    from avsm.settings import NetworkSettings

    p = demo_paths()
    fixed, moving = load_image(p["fixed"]), load_image(p["moving"])
    net = register(fixed=fixed, moving=moving, method="net", network_affine="opt", vsvf_steps=0, progress=False)
    ref = register(fixed=fixed, moving=moving, method="opt", spacing=4.2, progress=False)  # the net's grid
    assert net.info["affine_history"] and "affine" in net.timings
    torch.testing.assert_close(net.A, ref.A, atol=1e-6, rtol=0)
    torch.testing.assert_close(net.b, ref.b, atol=1e-6, rtol=0)
    with pytest.raises(AvsmError, match="network affine"):
        NetworkSettings(affine="magic")
