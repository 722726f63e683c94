"""QC figures are written, have the expected size and are not blank."""

from __future__ import annotations

import os

import matplotlib.image as mpimg
import numpy as np
import pytest

from avsm.api import identity_result
from avsm.baselines.base import FieldResult, WorldTransform
from avsm.io.image import load_image
from avsm.viz import dice_boxplot, jacobian_figure, pair_figure, plot_steps_curve

DATA = os.path.join(os.path.dirname(__file__), "data")


def _check_png(path: str, min_w: int = 300, min_h: int = 200) -> None:
    assert os.path.getsize(path) > 5000
    img = mpimg.imread(path)
    assert img.shape[1] >= min_w and img.shape[0] >= min_h
    assert float(np.std(img[..., :3])) > 0.02  # not uniform


@pytest.fixture(scope="module")
def vols():  # noqa: ANN201
    return (load_image(os.path.join(DATA, "mni_4mm.nii.gz")), load_image(os.path.join(DATA, "colin_4mm.nii.gz")),
            load_image(os.path.join(DATA, "mni_4mm_labels.nii.gz"), label=True),
            load_image(os.path.join(DATA, "colin_4mm_labels.nii.gz"), label=True))


def _warpy_result(fixed, moving) -> FieldResult:  # noqa: ANN001
    """A smooth non-affine transform with a fold, built as a world displacement field."""
    g = fixed.grid
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in g.shape], indexing="ij")
    f = np.zeros((3, *g.shape))
    f[0] = 6.0 * np.sin(2 * np.pi * y) * np.sin(np.pi * z)
    f[1] = 4.0 * np.sin(2 * np.pi * x)
    f[2, 20:24] = np.linspace(0, -30, 4).reshape(4, 1, 1)  # a folding slab
    M = np.eye(4)
    M[:3, 3] = [2.0, -1.0, 3.0]
    return FieldResult(fixed.grid, moving.grid, WorldTransform(affine=M, field_grid=g, field=f),
                       affine_forward=M, method="synthetic")


def test_pair_figure(vols, tmp_path) -> None:  # noqa: ANN001
    fixed, moving, fl, ml = vols
    res = _warpy_result(fixed, moving)
    out = pair_figure(fixed, moving, res, str(tmp_path / "pair.png"), fl, ml)
    _check_png(out, 1000, 500)
    out2 = pair_figure(fixed, moving, identity_result(fixed, moving), str(tmp_path / "sub" / "id.png"))
    _check_png(out2, 700, 500)


def test_jacobian_figure_marks_folds(vols, tmp_path) -> None:  # noqa: ANN001
    fixed, moving, _, _ = vols
    res = _warpy_result(fixed, moving)
    assert res.folds() > 0
    _check_png(jacobian_figure(res, str(tmp_path / "detj.png")))


def test_boxplot_and_steps_curve(tmp_path) -> None:  # noqa: ANN001
    csv_path = tmp_path / "results.csv"
    lines = ["pair_id,method,status,dice_mean,dice_per_label"]
    rng = np.random.default_rng(0)
    for m, mu in (("opt", 0.7), ("ants-syn", 0.68), ("demons", 0.65)):
        for p in range(5):
            d = mu + 0.02 * rng.normal()
            lines.append(f'{p},{m},ok,{d},"{{""1"": {d}, ""2"": {d - 0.1}}}"')
    lines.append("9,net,error,,")
    csv_path.write_text("\n".join(lines) + "\n")
    _check_png(dice_boxplot(str(csv_path), str(tmp_path / "box.png")))
    _check_png(dice_boxplot(str(csv_path), str(tmp_path / "box2.png"), per_label=True))
    recs = [{"kind": "vsvf", "steps": k, "dice": 0.6 + 0.02 * k, "folds": k * 3} for k in range(1, 6)]
    recs += [{"kind": "affine", "steps": k, "dice": 0.55 + 0.01 * k, "folds": 0} for k in range(1, 8)]
    _check_png(plot_steps_curve(recs, str(tmp_path / "steps.png")))
