"""``label`` warping from the 8 corner voxels equals the per-label definition, voxel for voxel.

The definition (:func:`avsm.core.sampling._warp_labels_per_label`): one trilinear
interpolation of each label's indicator, the arg-max, ties to the smallest label, the
outside counted as label 0 with ``zeros`` padding.  The fast path
(:func:`avsm.core.sampling._warp_labels`, :func:`~avsm.core.sampling.warp_label_indices`,
what :class:`avsm.transform.VolumeSampler` uses) must give exactly the same labels,
including on grids built to tie (half- and quarter-voxel positions), outside the image,
at NaN/inf coordinates and with label values missing from or added to the voted set.
Real label maps: OASIS-TRT-20 (Mindboggle DKT, about 100 labels) through a smooth random
deformation and an affine, skipped without ``../shared/data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avsm.core.coords import identity_map, to_grid_sample
from avsm.core.sampling import (
    _warp_labels,
    _warp_labels_per_label,
    label_indices,
    warp,
    warp_label_indices,
)
from avsm.transform import VolumeSampler

OASIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasis-trt20"


def _tie_grid(shape_in: tuple[int, int, int], shape_out: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``grid_sample`` grid mixing random points, points on half/quarter voxels (ties) and points outside."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape_in
    out = (1, *shape_out, 3)
    rand = torch.rand(out, generator=g) * 2.6 - 1.3
    step = torch.randint(-6, 4 * max(d, h, w) + 6, out, generator=g).float() / 4  # index units, quarter voxels
    snapped = step / torch.tensor([w - 1, h - 1, d - 1], dtype=torch.float32) * 2 - 1
    pick = torch.rand((*out[:-1], 1), generator=g) < 0.7
    return torch.where(pick, snapped, rand).float()


def _reversed_ties(labels: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    """The per-label arg-max with ties going to the *largest* label (to show ties occur)."""
    vals = sorted(torch.unique(labels).tolist(), reverse=True)
    best = best_w = None
    for v in vals:
        w = F.grid_sample((labels == v).float(), grid, mode="bilinear", padding_mode=padding, align_corners=True)
        if padding == "zeros" and v == 0:
            w = w + (1.0 - F.grid_sample(torch.ones_like(labels, dtype=torch.float32), grid, mode="bilinear",
                                         padding_mode="zeros", align_corners=True))
        if best is None:
            best, best_w = torch.full_like(w, float(v)), w
        else:
            better = w > best_w
            best = torch.where(better, torch.full_like(w, float(v)), best)
            best_w = torch.where(better, w, best_w)
    assert best is not None
    return best.round().to(labels.dtype)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("case", ["with0", "without0", "negative", "int64"])
def test_corner_vote_equals_per_label_on_synthetic_labels(padding: str, case: str) -> None:
    g = torch.Generator().manual_seed({"with0": 1, "without0": 2, "negative": 3, "int64": 4}[case])
    shape_in = (9, 11, 13)
    lab = torch.randint(0, 6, (1, 1, *shape_in), generator=g)
    lab = {"with0": lab.to(torch.int16), "without0": (lab + 3).to(torch.int32),
           "negative": (lab - 2).to(torch.int16), "int64": lab * 1000}[case]
    grid = _tie_grid(shape_in, (14, 12, 16), seed=len(case))
    grid[0, 0, 0, :3, 0] = float("nan")
    grid[0, 1, 0, :3, 1] = float("inf")
    grid[0, 2, 0, :3, 2] = -float("inf")
    ref = _warp_labels_per_label(lab, grid, padding)  # type: ignore[arg-type]
    new = _warp_labels(lab, grid, padding)  # type: ignore[arg-type]
    assert new.dtype == lab.dtype and new.shape == ref.shape
    assert torch.equal(new, ref), int((new != ref).sum())
    # the grid does produce ties (which the two tie rules resolve differently)
    finite = grid.isfinite().all(-1)[:, None]
    assert int(((_reversed_ties(lab, grid, padding) != ref) & finite).sum()) > 20


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_corner_vote_with_given_label_values(padding: str) -> None:
    g = torch.Generator().manual_seed(3)
    lab = torch.randint(0, 5, (1, 1, 8, 9, 10), generator=g).to(torch.int16)
    grid = _tie_grid((8, 9, 10), (10, 10, 10), seed=4)
    for values in ([0, 1, 3, 4], [1, 2, 3, 4, 77], [2], [0, 2, 4, 9]):  # missing and extra values
        ref = _warp_labels_per_label(lab, grid, padding, values)  # type: ignore[arg-type]
        new = _warp_labels(lab, grid, padding, values)  # type: ignore[arg-type]
        assert torch.equal(new, ref), (values, int((new != ref).sum()))


def test_corner_vote_batches_and_public_entry_points() -> None:
    g = torch.Generator().manual_seed(5)
    lab = torch.randint(0, 4, (2, 1, 7, 8, 9), generator=g).to(torch.uint8)
    phi = identity_map((10, 11, 12), batch=2) + 0.08 * torch.randn(2, 3, 10, 11, 12, generator=g)
    grid = to_grid_sample(phi).float()
    ref = _warp_labels_per_label(lab, grid, "zeros")
    assert torch.equal(warp(lab, phi, mode="label"), ref)
    # one label map, two maps (the map's batch broadcasts the labels)
    one = lab[:1]
    ref1 = _warp_labels_per_label(one.expand(2, *one.shape[1:]), grid, "zeros")
    assert torch.equal(warp(one, phi, mode="label"), ref1)
    values = torch.unique(one).tolist()
    assert torch.equal(warp_label_indices(label_indices(one, values), phi, values, dtype=torch.uint8), ref1)


def test_corner_vote_never_calls_grid_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its cost does not grow with the number of labels: no per-label interpolation at all."""
    lab = torch.arange(300, dtype=torch.int32).reshape(1, 1, 3, 10, 10)  # 300 labels
    phi = identity_map((6, 12, 12)) + 0.01

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("grid_sample called")

    monkeypatch.setattr(F, "grid_sample", boom)
    out = warp(lab, phi, mode="label")
    assert set(torch.unique(out).tolist()) <= set(range(300))


def _smooth_affine_map(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A smooth random deformation after a random affine, unit coordinates ``(1, 3, *shape)``."""
    g = torch.Generator().manual_seed(seed)
    idm = identity_map(shape, dtype=torch.float64)
    A = torch.eye(3, dtype=torch.float64) + 0.06 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = 0.02 * torch.randn(3, generator=g, dtype=torch.float64)
    phi = torch.einsum("ij,bjdhw->bidhw", A, idm - 0.5) + 0.5 + b.view(1, 3, 1, 1, 1)
    coarse = 0.015 * torch.randn(1, 3, 5, 6, 5, generator=g, dtype=torch.float64)
    return phi + F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


@pytest.mark.skipif(not OASIS.is_dir(), reason=f"needs {OASIS} (../shared/data, not shipped)")
@pytest.mark.parametrize("subject", ["trt02", "trt07"])
def test_corner_vote_equals_per_label_on_real_labels(subject: str) -> None:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(OASIS / f"{subject}_labels.nii.gz")))
    lab = torch.from_numpy(arr.astype(np.int32))[None, None, 40:120, 60:200, 60:200]  # the labelled middle
    n_labels = len(torch.unique(lab))
    assert n_labels > 60
    phi = _smooth_affine_map((60, 100, 100), seed=int(subject[-2:]))
    for padding in ("zeros", "border"):
        ref = _warp_labels_per_label(lab, to_grid_sample(phi).float(), padding)  # type: ignore[arg-type]
        new = warp(lab, phi, mode="label", padding=padding)  # type: ignore[arg-type]
        assert torch.equal(new, ref), (padding, int((new != ref).sum()))
        assert len(torch.unique(new)) > 0.8 * n_labels


@pytest.mark.skipif(not OASIS.is_dir(), reason=f"needs {OASIS} (../shared/data, not shipped)")
def test_volume_sampler_labels_equal_per_label_on_real_labels() -> None:
    """The pipeline's path (cropped source, label positions found once) against the definition."""
    from avsm.io.image import load_image
    from avsm.transform import apply_homogeneous

    vol = load_image(str(OASIS / "trt03_labels.nii.gz"), label=True)
    sampler = VolumeSampler(vol)
    # a slab of points spread over the middle of the label map, deformed
    phi = _smooth_affine_map((12, 120, 120), seed=11)
    phi = phi * torch.tensor([0.15, 0.7, 0.7], dtype=torch.float64).view(1, 3, 1, 1, 1) + \
        torch.tensor([0.42, 0.15, 0.15], dtype=torch.float64).view(1, 3, 1, 1, 1)
    world = apply_homogeneous(vol.grid.unit_to_world(), phi).float()
    got = sampler(world)
    # the reference on the same crop and the same cropped coordinates (a sampler that keeps the labels)
    u = apply_homogeneous(vol.grid.world_to_unit(), world)
    crop, uc = VolumeSampler(vol, "nearest")._crop(u)
    ref = _warp_labels_per_label(crop, to_grid_sample(uc).float(), "zeros", sampler.values)[0, 0].numpy()
    assert crop.shape[2:] != vol.array.shape  # the crop is exercised
    assert got.dtype == vol.array.dtype
    assert np.array_equal(got, ref), int((got != ref).sum())
    assert len(np.unique(got)) > 60


def test_dice_from_one_joint_histogram_equals_the_per_label_definition() -> None:
    """The summary's Dice (one joint histogram for all labels) against ``2|P∩T| / (|P|+|T|)`` label by label."""
    from avsm.metrics.overlap import dice_per_label

    rng = np.random.default_rng(1)
    pred = rng.integers(-3, 40, size=(20, 30, 25)).astype(np.int16)
    truth = np.where(rng.random(pred.shape) < 0.7, pred, rng.integers(-3, 45, size=pred.shape)).astype(np.int32)
    mapping = {5: 6, 6: 5, 7: 0, 44: 44}
    for labels, mp in ((None, None), ([1, 5, 44, 300, -3], None), ([5, 6, 7, 8, 44], mapping)):
        got = dice_per_label(pred, truth, labels=labels, mapping=mp)
        ref_labels = labels if labels is not None else sorted((set(np.unique(truth)) | set(np.unique(pred))) - {0})
        for t in ref_labels:
            p = (mp or {}).get(t, t)
            a, b = pred == p, truth == t
            den = int(a.sum() + b.sum())
            want = 2.0 * int((a & b).sum()) / den if den else float("nan")
            assert (np.isnan(want) and np.isnan(got[t])) or got[t] == want, (t, got[t], want)
        # the float path (no histogram) agrees
        flt = dice_per_label(pred.astype(np.float32), truth.astype(np.float32), labels=labels, mapping=mp)
        assert np.allclose(list(flt.values()), list(got.values()), equal_nan=True)
