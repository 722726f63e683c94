"""Tests of the label-map image synthesis (:mod:`avsm.train.synth`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from avsm.core.coords import identity_map
from avsm.core.jacobian import jacobian_determinant
from avsm.train.synth import (
    BRAIN_LABELS,
    NON_BRAIN_LABELS,
    SynthConfig,
    SynthPairs,
    deform_labels,
    load_label_maps,
    mixture,
    random_deformation,
    render_image,
    sample_params,
    skull_strip,
    synthesise_image,
)

SYNTHSEG_MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthseg-label-maps"

#: every nuisance off: the image is the mixture, rescaled
PLAIN = SynthConfig(blur_sigma_range=(0.0, 0.0), bias_strength=0.0, gamma_log_std=0.0,
                    noise_std_range=(0.0, 0.0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These volumes are tiny: one intra-op thread is faster, and immune to a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def head(n: int = 32, *, background: int = 0) -> torch.Tensor:
    """A synthetic ``(1, 1, n, n, n)`` head: scalp 507 and skull 515 around a brain of WM 2 / 41,
    cortex 3 / 42, ventricle 4 and CSF 24 (FreeSurfer / SynthSeg values), on ``background``."""
    x = identity_map((n, n, n))[0]
    r = ((x - 0.5) ** 2).sum(0).sqrt()
    lab = torch.full((n, n, n), background, dtype=torch.int64)
    left = x[2] < 0.5
    lab[r < 0.47] = 507
    lab[r < 0.42] = 515
    lab[r < 0.38] = 24
    lab[(r < 0.34) & left] = 3
    lab[(r < 0.34) & ~left] = 42
    lab[(r < 0.26) & left] = 2
    lab[(r < 0.26) & ~left] = 41
    lab[r < 0.12] = 4
    return lab[None, None]


def _values(t: torch.Tensor) -> set[int]:
    return {int(v) for v in torch.unique(t)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [
    {"max_displacement": -1.0}, {"max_displacement": float("nan")}, {"control_points": 1},
    {"control_points": 2.5}, {"std_range": (0.2, 0.1)}, {"std_range": (-0.1, 0.1)},
    {"mean_range": (0.0,)}, {"blur_sigma_range": (0.0, float("inf"))}, {"bias_strength": -0.1},
    {"bias_control": 1}, {"gamma_log_std": -0.5}, {"noise_std_range": (0.1, 0.0)},
    {"p_skull_strip": 1.5}, {"non_brain_labels": (0, 507)}, {"non_brain_labels": (507.5,)},
    {"label_interpolation": "linear"},
])
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SynthConfig(**bad)  # type: ignore[arg-type]


def test_config_normalises_sequences() -> None:
    cfg = SynthConfig(std_range=[0.0, 0.2], non_brain_labels=[530, 502, 502])  # type: ignore[arg-type]
    assert cfg.std_range == (0.0, 0.2) and cfg.non_brain_labels == (502, 530)
    assert hash(cfg) == hash(SynthConfig(std_range=(0.0, 0.2), non_brain_labels=(502, 530)))
    assert SynthConfig(**SynthConfig().to_dict()) == SynthConfig()  # type: ignore[arg-type]
    assert not set(BRAIN_LABELS) & set(NON_BRAIN_LABELS) and 24 in BRAIN_LABELS


# --------------------------------------------------------------------------- deformation


def test_deformation_is_bounded_smooth_and_invertible() -> None:
    shape = (24, 32, 40)  # anisotropic: the bound is per axis, in voxels of each axis
    cfg = SynthConfig(max_displacement=3.0, random_strength=False)
    vox = torch.tensor([s - 1 for s in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    for seed in range(4):
        phi = random_deformation(shape, _gen(seed), cfg)
        assert phi.shape == (1, 3, *shape) and phi.dtype == torch.float32
        disp = ((phi - identity_map(shape)) * vox).abs()
        assert float(disp.max()) <= 3.0 + 1e-3
        assert float(disp.max()) > 1.0  # it does deform
        assert float(jacobian_determinant(phi.double()).min()) > 0.0  # no folds
    torch.testing.assert_close(random_deformation(shape, _gen(0), SynthConfig(max_displacement=0.0)),
                               identity_map(shape), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["nearest", "label"])
def test_deform_labels_never_invents_labels_and_keeps_volumes(mode: str) -> None:
    lab = head(background=9)  # no 0 in the map: padding must not bring one in either
    cfg = SynthConfig(max_displacement=3.0, random_strength=False, label_interpolation=mode)  # type: ignore[arg-type]
    for seed in range(3):
        out = deform_labels(lab, _gen(seed), cfg)
        assert out.shape == lab.shape and out.dtype == lab.dtype
        assert _values(out) <= _values(lab)
        assert float((out != lab).float().mean()) > 0.02  # it does deform
        for v in _values(lab):
            before, after = int((lab == v).sum()), int((out == v).sum())
            if before >= 500:
                assert abs(after / before - 1.0) < 0.2, (v, before, after)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_output_different_seed_differs() -> None:
    lab = head()
    cfg = SynthConfig()
    a = deform_labels(lab, _gen(3), cfg), synthesise_image(lab, _gen(3), cfg)
    b = deform_labels(lab, _gen(3), cfg), synthesise_image(lab, _gen(3), cfg)
    c = deform_labels(lab, _gen(4), cfg), synthesise_image(lab, _gen(4), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])
    assert not torch.equal(a[0], c[0])
    assert not torch.allclose(a[1][0], c[1][0])


def test_synthesise_image_is_sample_params_then_render() -> None:
    lab = head()
    cfg = SynthConfig(p_skull_strip=1.0)
    img, lab_out = synthesise_image(lab, _gen(11), cfg)
    g = _gen(11)
    p = sample_params(lab, g, cfg)
    assert p.strip and torch.equal(lab_out, skull_strip(lab))
    assert torch.equal(render_image(lab_out, p, g), img)


# --------------------------------------------------------------------------- skull stripping


def test_skull_strip_removes_exactly_the_non_brain_labels() -> None:
    lab = head()
    lab[0, 0, :2, :2, :2] = 530  # a non-brain label touching the border
    non_brain = torch.isin(lab, torch.tensor(NON_BRAIN_LABELS))
    assert int(non_brain.sum()) > 0
    for cfg, strip in [(SynthConfig(p_skull_strip=1.0), None), (SynthConfig(p_skull_strip=0.0), True)]:
        _img, out = synthesise_image(lab, _gen(0), cfg, strip=strip)
        assert torch.equal(out[non_brain], torch.zeros_like(out[non_brain]))
        assert torch.equal(out[~non_brain], lab[~non_brain])  # everything else untouched
        assert _values(out) == _values(lab) - set(NON_BRAIN_LABELS)
        assert 24 in _values(out)  # CSF is kept
    for cfg, strip in [(SynthConfig(p_skull_strip=0.0), None), (SynthConfig(p_skull_strip=1.0), False)]:
        assert torch.equal(synthesise_image(lab, _gen(0), cfg, strip=strip)[1], lab)
    # a custom set
    assert _values(skull_strip(lab, (24, 3))) == _values(lab) - {24, 3}
    # the probability is honoured
    stripped = [sample_params(lab, _gen(s), SynthConfig(p_skull_strip=0.3)).strip for s in range(200)]
    assert 0.2 < sum(stripped) / len(stripped) < 0.4


# --------------------------------------------------------------------------- intensities


def test_image_is_float32_in_unit_range() -> None:
    lab = head()
    for seed in range(4):
        img, _ = synthesise_image(lab, _gen(seed), SynthConfig(noise_std_range=(0.05, 0.1)))
        assert img.shape == lab.shape and img.dtype == torch.float32
        assert bool(torch.isfinite(img).all())
        assert float(img.min()) == 0.0 and float(img.max()) == 1.0


def test_mixture_spread_matches_sampled_std() -> None:
    lab = head(48)
    cfg = SynthConfig(std_range=(0.02, 0.2), blur_sigma_range=(0.0, 0.0), bias_strength=0.0,
                      gamma_log_std=0.0, noise_std_range=(0.0, 0.0), p_skull_strip=0.0)
    g = _gen(5)
    p = sample_params(lab, g, cfg)
    assert p.values.tolist() == sorted(_values(lab))
    assert bool(((p.means >= 0) & (p.means <= 1)).all()) and bool(((p.stds >= 0.02) & (p.stds <= 0.2)).all())
    raw = mixture(lab, p, g)
    for v, mu, sd in zip(p.values.tolist(), p.means.tolist(), p.stds.tolist()):
        x = raw[lab == v].double()
        n = x.numel()
        assert n >= 500
        assert abs(float(x.mean()) - mu) < 4 * sd / math.sqrt(n)
        assert abs(float(x.std()) / sd - 1.0) < 4 / math.sqrt(2 * n) + 0.01
    # after the final rescale, every label's spread is its std times one common factor
    img, _ = synthesise_image(lab, _gen(5), cfg)
    ratio = [float(img[lab == v].double().std()) / sd for v, sd in zip(p.values.tolist(), p.stds.tolist())]
    assert max(ratio) / min(ratio) < 1.1


@pytest.mark.parametrize("gamma_log_std", [0.0, 0.5])
def test_piecewise_constant_image_equals_rescaled_means(gamma_log_std: float) -> None:
    lab = head()
    cfg = SynthConfig(std_range=(0.0, 0.0), blur_sigma_range=(0.0, 0.0), bias_strength=0.0,
                      gamma_log_std=gamma_log_std, noise_std_range=(0.0, 0.0), p_skull_strip=0.0)
    for seed in range(3):
        p = sample_params(lab, _gen(seed), cfg)
        img, _ = synthesise_image(lab, _gen(seed), cfg)
        assert (p.gamma == 1.0) == (gamma_log_std == 0.0)
        mu = p.means
        expect = ((mu - mu.min()) / (mu.max() - mu.min())) ** p.gamma
        for v, e in zip(p.values.tolist(), expect.tolist()):
            vals = img[lab == v]
            assert float(vals.max() - vals.min()) == 0.0  # constant on the label
            assert abs(float(vals[0]) - e) < 1e-5


def test_blur_matches_gaussian_edge_profile() -> None:
    """A step edge blurred by sigma has the profile Phi(d / sigma), d = distance to the edge."""
    n, sigma = 32, 1.5
    lab = torch.zeros(1, 1, n, n, n, dtype=torch.int64)
    lab[..., n // 2:] = 1  # edge halfway between W indices 15 and 16
    cfg = SynthConfig(std_range=(0.0, 0.0), blur_sigma_range=(sigma, sigma), bias_strength=0.0,
                      gamma_log_std=0.0, noise_std_range=(0.0, 0.0), p_skull_strip=0.0)
    img, _ = synthesise_image(lab, _gen(2), cfg)
    p = sample_params(lab, _gen(2), cfg)
    if p.means[1] < p.means[0]:
        img = 1.0 - img
    profile = img[0, 0, n // 2, n // 2].double()
    for i in range(n // 2 - 5, n // 2 + 5):
        d = i - (n // 2 - 0.5)
        assert abs(float(profile[i]) - 0.5 * (1 + math.erf(d / (sigma * math.sqrt(2))))) < 0.02


def test_bias_field_is_smooth_and_multiplicative() -> None:
    lab = torch.zeros(1, 1, 32, 32, 32, dtype=torch.int64)
    lab[..., 8:24, 8:24, 8:24] = 1
    cfg = SynthConfig(mean_range=(0.5, 1.0), std_range=(0.0, 0.0), blur_sigma_range=(0.0, 0.0),
                      bias_strength=0.6, gamma_log_std=0.0, noise_std_range=(0.0, 0.0), p_skull_strip=0.0)
    img, _ = synthesise_image(lab, _gen(8), cfg)
    inside = img[0, 0, 8:24, 8:24, 8:24]
    assert float(inside.max() - inside.min()) > 0.02  # the field varies
    assert float(inside.diff(dim=2).abs().max()) < 0.1  # but slowly (no voxel-scale jumps)


# --------------------------------------------------------------------------- dataset


def test_synth_pairs_are_a_pure_function_of_seed_and_index() -> None:
    maps = [head(24), head(24, background=0).clone()]
    maps[1][maps[1] == 4] = 2  # a second "subject" without ventricle
    ds = SynthPairs(maps, SynthConfig(), seed=7, length=6)
    assert len(ds) == 6
    x, y = ds[2], SynthPairs(maps, SynthConfig(), seed=7, length=6)[2]
    assert set(x) == {"moving", "fixed", "moving_labels", "fixed_labels", "pair"}
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert x["moving"].shape == (1, 24, 24, 24) and x["moving"].dtype == torch.float32
    assert x["moving_labels"].shape == (1, 24, 24, 24) and x["moving_labels"].dtype == torch.int64
    assert not torch.equal(ds[3]["moving"], x["moving"])
    assert not torch.equal(SynthPairs(maps, SynthConfig(), seed=8, length=6)[2]["moving"], x["moving"])
    assert not torch.equal(x["moving"], x["fixed"])  # independent contrasts and deformations
    for i in range(len(ds)):
        it = ds[i]
        a, b = it["pair"].tolist()
        assert _values(it["moving_labels"]) <= _values(maps[a]) and _values(it["fixed_labels"]) <= _values(maps[b])
        for k in ("moving", "fixed"):
            assert float(it[k].min()) >= 0.0 and float(it[k].max()) <= 1.0
        # the skull-strip decision is shared by both images of a pair
        nb = [bool(torch.isin(it[k], torch.tensor(NON_BRAIN_LABELS)).any()) for k in ("moving_labels", "fixed_labels")]
        assert nb[0] == nb[1]
    assert all(ds2["pair"][0] == ds2["pair"][1] for ds2 in SynthPairs(maps, seed=1, length=4, p_same_map=1.0))
    assert all(ds2["pair"][0] != ds2["pair"][1] for ds2 in SynthPairs(maps, seed=1, length=4, p_same_map=0.0))
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["moving"], x["moving"])
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError):
        SynthPairs([head(24), head(32)], seed=0, length=2)
    with pytest.raises(ValueError):
        SynthPairs([head(24).float()], seed=0, length=2)


# --------------------------------------------------------------------------- loading


def test_load_label_maps_reorients_and_keeps_the_box(tmp_path: Path) -> None:
    """Labels drawn by world octant on an LIA, anisotropic grid land in the right canonical corner."""
    size = (20, 30, 24)  # ITK (x, y, z)
    spacing = (1.0, 0.8, 1.5)
    direction = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # LIA, as the SynthSeg maps
    # world x = 0 a quarter of the way along the L-R extent; y = 0 and z = 0 in the middle
    # (ITK j runs towards I, i.e. -z, and k towards A, i.e. -y)
    origin = (-0.25 * spacing[0] * (size[0] - 1), 0.5 * spacing[2] * (size[2] - 1),
              0.5 * spacing[1] * (size[1] - 1))
    img = sitk.Image(size, sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    arr = np.zeros(size[::-1], dtype=np.int16)
    for k in range(size[2]):
        for j in range(size[1]):
            for i in range(size[0]):
                x, y, z = img.TransformIndexToPhysicalPoint((i, j, k))
                arr[k, j, i] = 1 + (x > 0) + 2 * (y > 0) + 4 * (z > 0)
    out_img = sitk.GetImageFromArray(arr)
    out_img.CopyInformation(img)
    path = tmp_path / "octants.nii.gz"
    sitk.WriteImage(out_img, str(path))

    (lab,) = load_label_maps([path], (16, 24, 32))
    assert lab.shape == (1, 1, 16, 24, 32) and lab.dtype == torch.int64
    assert _values(lab) <= set(range(1, 9))
    lab3 = lab[0, 0]
    # canonical LPS: tensor axis 2 runs towards L (+x), axis 1 towards P (+y), axis 0 towards S (+z)
    assert int(lab3[0, 0, 0]) == 1 and int(lab3[-1, -1, -1]) == 8
    xs = ((lab3[0, 0] - 1) % 2).float()  # 1 where x > 0 along the L-R axis
    assert abs(float(1.0 - xs.mean()) - 0.25) < 0.05  # the box is kept: x = 0 a quarter of the way
    with pytest.raises(ValueError):
        load_label_maps([path], (16, 24))


def test_real_synthseg_map() -> None:
    maps = sorted(SYNTHSEG_MAPS.glob("training_seg_*.nii.gz"))
    if not maps:
        pytest.skip(f"shared SynthSeg label maps not found in {SYNTHSEG_MAPS}")
    (lab,) = load_label_maps(maps[:1], (64, 64, 64))
    present = _values(lab)
    # the label choice covers the data: every value is background, brain or non-brain
    assert present <= {0} | set(BRAIN_LABELS) | set(NON_BRAIN_LABELS)
    assert present & set(NON_BRAIN_LABELS) and {2, 3, 24, 41, 42} <= present
    img, out = synthesise_image(lab, _gen(0), SynthConfig(), strip=True)
    assert _values(out) == present - set(NON_BRAIN_LABELS)
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    # stripping takes the head off: the non-zero region shrinks a lot
    assert int((out > 0).sum()) < 0.7 * int((lab > 0).sum())
    deformed = deform_labels(lab, _gen(1), SynthConfig(label_interpolation="label"))
    assert _values(deformed) <= present
