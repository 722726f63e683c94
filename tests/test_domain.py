"""Does an input look like the network's training data?  Signature, reference, checks, register() warnings."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from avsm.api import register, to_working, working_grid_for
from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image
from avsm.models.avsm import AVSM, AVSMConfig
from avsm.models.domain import (
    HEAD_EXTENT_MM,
    DomainReference,
    add_reference_to_weights,
    check_input,
    fit_reference,
    intensity_signature,
    signature_distance,
)
from avsm.models.pretrained import load_pretrained

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
SPACING = 4.2  # the bundled model's working spacing
EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------- synthetic heads

def synthetic_head(seed: int, *, stripped: bool = False, ct: bool = False, shape: tuple[int, int, int] = (48, 56, 48),
                   spacing: float = 4.0) -> Volume:
    """A T1-like head phantom: fat-bright scalp, dark skull and CSF, GM < WM, ventricles, folded cortex.

    Random per seed: head size and position, tissue intensities, noise, scanner scale.
    ``stripped`` keeps the brain only; ``ct`` gives the same anatomy in Hounsfield units.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    ax = rng.uniform(0.78, 0.9, 3)
    c = rng.uniform(-0.04, 0.04, 3)
    r = np.sqrt(((z - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2 + ((x - c[2]) / ax[2]) ** 2)
    vent = np.sqrt(((z - c[0]) / 0.12) ** 2 + ((y - c[1]) / 0.25) ** 2 + ((x - c[2]) / 0.1) ** 2) < 1
    fold = 0.03 * np.sin(9 * np.arctan2(y, x)) * np.cos(7 * z)
    if ct:
        tissue = (-80.0, 900.0, 8.0, 38.0, 28.0)  # fat, bone, CSF, GM, WM in HU
        a = np.full(shape, -1000.0)
    else:
        tissue = (rng.uniform(0.8, 1.0), rng.uniform(0.05, 0.12), rng.uniform(0.1, 0.18), rng.uniform(0.45, 0.55),
                  rng.uniform(0.7, 0.8))
        a = np.zeros(shape)
    fat, skull, csf, gm, wm = tissue
    a[r <= 1.0] = fat
    a[r <= 0.93] = skull
    a[r <= 0.87] = csf
    a[r <= 0.83 + fold] = gm
    a[r <= 0.68 + fold] = wm
    a[vent] = csf
    if ct:
        a = a + rng.normal(0.0, 8.0, shape)
    else:
        if stripped:
            a[r > 0.85] = 0.0
        a = np.where(a > 0, a * (1 + rng.normal(0.0, 0.1, shape)), 0.0) * rng.uniform(200, 4000)
    sp = (spacing,) * 3
    grid = Grid(shape, sp, tuple(-0.5 * (n - 1) * s for n, s in zip(shape[::-1], sp)), EYE)
    return Volume(a.astype(np.float32), grid)


def working(v: Volume, modality: str = "mr") -> np.ndarray:
    """As :func:`avsm.api.prepare_pair` brings an image to the network's working grid."""
    return to_working(v, working_grid_for(v.grid, spacing=SPACING, keep_thick_slices=modality == "ct"), modality)


@pytest.fixture(scope="module")
def synthetic_reference() -> DomainReference:
    # like the real training data: whole heads and skull-stripped brains
    return fit_reference([working(synthetic_head(s, stripped=s % 2 == 1)) for s in range(12)])


def test_signature_is_a_normalised_foreground_histogram() -> None:
    img = np.zeros((10, 10, 10), dtype=np.float32)
    img[:5] = 0.5  # 500 foreground voxels, all in one bin
    img[5:7] = 0.01  # below the foreground threshold: ignored
    s = intensity_signature(torch.from_numpy(img)[None, None], bins=10)
    assert s.shape == (10,) and s.sum() == pytest.approx(1.0)
    assert s[int((0.5 - 0.02) / (0.98 / 10))] == pytest.approx(1.0)
    assert intensity_signature(np.zeros((4, 4, 4)), bins=8).sum() == 0.0  # no foreground
    assert signature_distance(s, s) == pytest.approx(0.0, abs=1e-12)
    other = np.roll(s, 3)
    assert signature_distance(s, other) == pytest.approx(1.0)  # disjoint histograms: 1 bit
    assert signature_distance(s, other) == pytest.approx(signature_distance(other, s))


def test_reference_accepts_a_new_member_and_rejects_ct(synthetic_reference: DomainReference) -> None:
    ref = synthetic_reference
    assert ref.threshold == pytest.approx(2.0 * ref.training_max) and ref.n_images == 12
    for seed in (100, 101, 102, 103):  # new heads of the family, whole and stripped
        v = synthetic_head(seed, stripped=seed % 2 == 1)
        assert check_input(working(v), v.grid.extent_mm, "mr", ref) == [], seed
    ct = synthetic_head(100, ct=True)
    # forced through as MR (``--modality mr``) the histogram alone gives it away
    reasons = check_input(working(ct), ct.grid.extent_mm, "mr", ref)
    assert len(reasons) == 1 and "intensity histogram" in reasons[0]
    d = ref.distance_of(working(ct))
    assert f"distance {d:.3f} > threshold {ref.threshold:.3f}" in reasons[0]
    # windowed as CT: the modality and the histogram
    reasons = check_input(working(ct, "ct"), ct.grid.extent_mm, "ct", ref)
    assert any("CT" in r for r in reasons) and any("intensity histogram" in r for r in reasons)


def test_reference_rejects_a_chest_sized_field_of_view(synthetic_reference: DomainReference) -> None:
    big = synthetic_head(3, shape=(90, 80, 90))  # 356 × 316 × 356 mm
    reasons = check_input(working(big), big.grid.extent_mm, "mr", synthetic_reference)
    assert any("field of view 356×316×356 mm" in r and "100–300 mm" in r for r in reasons), reasons


def test_without_a_reference_only_modality_and_extent_are_checked() -> None:
    img = np.random.default_rng(0).uniform(0, 1, (8, 8, 8))  # any histogram: not checked
    assert check_input(img, (200.0, 220.0, 180.0), "mr", None) == []
    reasons = check_input(img, (400.0, 220.0, 180.0), "ct", None)
    assert len(reasons) == 2 and "CT" in reasons[0] and "field of view" in reasons[1]
    assert HEAD_EXTENT_MM == (100.0, 300.0)


def test_reference_dict_round_trip(synthetic_reference: DomainReference) -> None:
    d = json.loads(json.dumps(synthetic_reference.to_dict()))
    back = DomainReference.from_dict({**d, "from_a_future_version": 1})
    np.testing.assert_allclose(back.mean_signature, synthetic_reference.mean_signature)
    assert back.threshold == synthetic_reference.threshold and back.extent_mm == synthetic_reference.extent_mm
    assert back.modality == "mr" and back.bins == 32 and back.n_images == 12
    with pytest.raises(ValueError):
        fit_reference([np.zeros((4, 4, 4)), np.full((4, 4, 4), 0.5)])  # an image without foreground


def test_reference_is_stored_in_a_weights_file_and_loaded_with_the_model(tmp_path: Path,
                                                                         synthetic_reference: DomainReference
                                                                         ) -> None:
    cfg = AVSMConfig(affine_base=4, affine_depth=3, unet_base=4, time_steps=4)
    model = AVSM(cfg)
    path = tmp_path / "w.pt"
    torch.save({**model.export_state(), "meta": {"source": "test"}}, path)
    assert load_pretrained(str(path)).domain is None  # old weights: no reference
    add_reference_to_weights(path, synthetic_reference)
    loaded = load_pretrained(str(path))  # strict state-dict loading still works
    assert loaded.domain is not None
    np.testing.assert_allclose(loaded.domain.mean_signature, synthetic_reference.mean_signature)
    assert loaded.domain.threshold == pytest.approx(synthetic_reference.threshold)
    state = torch.load(path, weights_only=False)
    assert state["meta"]["source"] == "test"  # the rest of meta is kept
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["meta"]["domain"]["threshold"] == pytest.approx(synthetic_reference.threshold)
    assert AVSM.from_state(loaded.export_state()).domain.threshold == pytest.approx(loaded.domain.threshold)


# ---------------------------------------------------------------------- register() warnings

def ct_like(mr: Volume) -> Volume:
    """The brain of an MR fixture in Hounsfield units: air, a bone ring, soft tissue."""
    brain = mr.array > 0.05 * mr.array.max()
    rng = np.random.default_rng(0)
    hu = np.full(mr.array.shape, -1000.0, dtype=np.float32)
    hu[ndimage.binary_dilation(brain, iterations=2)] = 800.0
    hu[brain] = 30.0 + rng.normal(0.0, 10.0, int(brain.sum()))
    return mr.with_array(hu)


def _domain_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "avsm.api" and r.levelno == logging.WARNING and "training data" in r.getMessage()]


def test_register_with_the_network_warns_once_for_a_ct_input(caplog: pytest.LogCaptureFixture) -> None:
    fixed = load_image(DATA / "mni_4mm.nii.gz")
    moving = ct_like(fixed)
    with caplog.at_level(logging.WARNING, logger="avsm.api"):
        res = register(fixed=fixed, moving=moving, method="net", init="header", progress=False)
    msgs = _domain_records(caplog)
    assert len(msgs) == 1, msgs  # one warning, for the moving image only
    assert msgs[0].startswith("moving image") and "CT" in msgs[0] and "use --method opt" in msgs[0]
    warn = res.info["domain_warnings"]
    # the bundled weights carry a reference: the CT histogram may be a second reason, the T1 passes it
    assert warn["fixed"] == [] and any("CT" in r for r in warn["moving"])


def test_register_uses_the_models_reference(caplog: pytest.LogCaptureFixture) -> None:
    """With a reference on the model, an MR-labelled input with a CT histogram is flagged; real T1s are not."""
    t1s = [load_image(DATA / n) for n in ("mni_4mm.nii.gz", "colin_4mm.nii.gz")]  # skull-stripped T1s
    # a family: the two fixtures under a few monotone intensity changes (other scanners)
    fam = [t.with_array((t.array.astype(np.float32) / t.array.max()) ** g) for t in t1s
           for g in (0.7, 0.85, 1.0, 1.2, 1.4)]
    model = load_pretrained()
    model.domain = fit_reference([working(v) for v in fam])
    fixed = t1s[1]
    moving = ct_like(t1s[0])
    with caplog.at_level(logging.WARNING, logger="avsm.api"):
        res = register(fixed=fixed, moving=moving, method="net", init="header", modality="mr", model=model,
                       progress=False)
    msgs = _domain_records(caplog)
    assert len(msgs) == 1 and msgs[0].startswith("moving image") and "intensity histogram" in msgs[0], msgs
    assert res.info["domain_warnings"]["fixed"] == []
    assert not any("CT" in r for r in res.info["domain_warnings"]["moving"])  # forced to MR: no modality reason


def test_register_cli_warns_and_records_it_in_the_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from avsm.cli.main import main
    from avsm.io.image import save_image

    fixed = load_image(DATA / "mni_4mm.nii.gz")
    save_image(ct_like(fixed), tmp_path / "ct.nii.gz")
    with caplog.at_level(logging.WARNING):
        rc = main(["register", "--fixed", str(DATA / "mni_4mm.nii.gz"), "--moving", str(tmp_path / "ct.nii.gz"),
                   "--method", "net", "--init", "header", "--out-dir", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    msgs = _domain_records(caplog)
    assert len(msgs) == 1 and "ct.nii.gz" in msgs[0] and "use --method opt" in msgs[0], msgs
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["domain_warnings"]["fixed"] == [] and "CT" in summary["domain_warnings"]["moving"][0]


def test_register_without_the_network_has_no_domain_check() -> None:
    fixed = load_image(DATA / "mni_4mm.nii.gz")
    res = register(fixed=fixed, moving=ct_like(fixed), method="affine", progress=False, spacing=8.0)
    assert "domain_warnings" not in res.info


# ---------------------------------------------------------------------- real data (../shared/data)

def _script():
    spec = importlib.util.spec_from_file_location("domain_reference", ROOT / "scripts" / "domain_reference.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_reference_accepts_other_t1_and_rejects_chest_ct() -> None:
    """Fitted on 20 IXI training subjects (whole + skull-stripped), as ``scripts/domain_reference.py`` does."""
    need = [SHARED / "ixi185", SHARED / "oasis-trt20" / "trt01.nii.gz", SHARED / "colin27_brain.nii.gz",
            SHARED / "ct" / "3DCT_lung_baseline.mha"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        pytest.skip(f"needs ../shared/data (not shipped): missing {', '.join(missing)}")
    from avsm.api import detect_modality
    from avsm.train.cohort import ixi_subjects, split_subjects

    script = _script()
    ref = fit_reference([w for _, w in script.ixi_images(SHARED / "ixi185", train_only=True, spacing=SPACING,
                                                         max_subjects=20)])
    assert ref.n_images == 40
    held = split_subjects(ixi_subjects(SHARED / "ixi185"))[1]
    assert held
    for s in held:
        t1 = load_image(s.image)
        for name, v in (("whole", t1), ("stripped", script.skull_stripped(t1, load_image(s.labels, label=True)))):
            assert check_input(working(v), v.grid.extent_mm, "mr", ref) == [], (s.id, name, ref.distance_of(working(v)))
    for p in (SHARED / "oasis-trt20" / "trt01.nii.gz", SHARED / "colin27_brain.nii.gz", SHARED / "colin27_t1.nii.gz"):
        v = load_image(p)  # T1 from other scanners
        assert check_input(working(v), v.grid.extent_mm, detect_modality(v), ref) == [], (p.name,
                                                                                          ref.distance_of(working(v)))
    ct = load_image(SHARED / "ct" / "3DCT_lung_baseline.mha")
    mod = detect_modality(ct)
    reasons = check_input(working(ct, mod), ct.grid.extent_mm, mod, ref)
    assert mod == "ct" and any("CT" in r for r in reasons) and any("intensity histogram" in r for r in reasons)
    # also when forced through as MR, by its histogram alone
    assert any("intensity histogram" in r for r in check_input(working(ct), ct.grid.extent_mm, "mr", ref))
