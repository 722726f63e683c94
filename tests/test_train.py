"""Tests of the training code: loss decreases, exact resume, checkpoints, augmentation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avsm.core.coords import identity_map
from avsm.errors import AvsmError
from avsm.models.avsm import AVSMConfig
from avsm.train.augment import AugmentConfig, augment_volume, random_map
from avsm.train.data import PairDataset, VolumeRecord, all_pairs, validation_pairs
from avsm.train.trainer import Trainer, TrainConfig, export_weights, load_model_file

TINY = AVSMConfig(affine_base=4, affine_depth=3, unet_base=4, affine_steps_train=2, affine_steps_test=2,
                  vsvf_steps_train=1, vsvf_steps_test=1, time_steps=4).to_dict()


def synthetic_volumes(n: int = 32) -> list[VolumeRecord]:
    """Two synthetic subjects ``(1, 1, n, n, n)`` with 3-label maps."""
    x = identity_map((n, n, n))[0]
    out = []
    for k, (off, radii) in enumerate([((0.0, 0.0, 0.0), (0.32, 0.36, 0.30)),
                                      ((0.07, -0.05, 0.04), (0.27, 0.40, 0.26))]):
        c = torch.tensor(off).view(3, 1, 1, 1) + 0.5
        r = (((x - c) / torch.tensor(radii).view(3, 1, 1, 1)) ** 2).sum(0)
        img = torch.sigmoid((1.0 - r) * 10.0) * 0.5
        inner = torch.exp(-(((x - c - 0.08) ** 2).sum(0)) / 0.006)
        img = (img + 0.5 * inner).clamp(0, 1)
        lab = (r < 1.0).long() + (inner > 0.5).long()
        out.append(VolumeRecord(f"s{k}", f"s{k}", img[None, None], lab[None, None]))
    return out


def _cfg(tmp: Path, **kw: object) -> TrainConfig:
    base = dict(out=str(tmp), stage="affine", epochs=1, iters_per_epoch=2, lr=1e-3, seed=3,
                val_per_volume=1, threads=1, model=TINY, augmentation={})
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_augmentation_is_seeded_and_diffeomorphic() -> None:
    vols = synthetic_volumes()
    cfg = AugmentConfig()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a1, l1 = augment_volume(vols[0].image, vols[0].labels, g1, cfg)
    a2, l2 = augment_volume(vols[0].image, vols[0].labels, g2, cfg)
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    assert l1 is not None and l2 is not None and torch.equal(l1, l2)
    assert a1.min() >= 0 and a1.max() <= 1 and l1.dtype == torch.int64
    from avsm.core.jacobian import jacobian_determinant

    phi = random_map(torch.Generator().manual_seed(1), (32, 32, 32), cfg)
    assert float(jacobian_determinant(phi.double()).min()) > 0
    ds = PairDataset(vols, 4, seed=1)
    ds.set_epoch(2)
    x, y = ds[1], ds[1]
    torch.testing.assert_close(x["moving"], y["moving"], atol=0, rtol=0)
    ds.set_epoch(3)
    assert not torch.equal(ds[1]["moving"], x["moving"])
    assert ds[0]["moving"].shape == (1, 32, 32, 32)
    assert "moving_labels" in ds[0] and "moving_labels" not in ds[1]  # same subject only
    assert len(all_pairs(2)) == 4 and len(all_pairs(2, same_subject=False)) == 2
    assert len(validation_pairs(vols)) == 2
    off = PairDataset(vols, 2, augment=False)
    torch.testing.assert_close(off[0]["moving"], vols[0].image[0])


def test_training_lowers_loss(tmp_path: Path) -> None:
    """A few steps on one fixed, un-augmented pair lower both stages' losses."""
    torch.manual_seed(0)
    vols = synthetic_volumes()
    cfg = _cfg(tmp_path / "a", augment=False, lr=3e-3, val_per_volume=0)
    tr = Trainer(cfg, vols)
    batch = {"moving": vols[1].image, "fixed": vols[0].image}
    first = tr.train_step(batch, 0, 0.0)["sim"]
    for _ in range(12):
        last = tr.train_step(batch, 0, 0.0)["sim"]
    assert last < first - 1e-3, (first, last)

    torch.save(tr.checkpoint(0), tmp_path / "aff.pt")
    cfg2 = _cfg(tmp_path / "v", stage="vsvf", augment=False, lr=1e-3, val_per_volume=0,
                init_from=str(tmp_path / "aff.pt"))
    tr2 = Trainer(cfg2, vols)
    assert all(not p.requires_grad for p in tr2.model.affine.parameters())
    totals = [tr2.train_step(batch, 0, 0.0)["total"] for _ in range(10)]
    assert sum(totals[-3:]) / 3 < totals[0] - 1e-4, totals


def _step_losses(path: Path) -> list[float]:
    return [json.loads(line)["total"] for line in path.read_text().splitlines()
            if json.loads(line)["kind"] == "step"]


@pytest.mark.parametrize("stage", ["affine", "vsvf"])
def test_resume_is_exact(tmp_path: Path, stage: str) -> None:
    vols = synthetic_volumes()
    init = None
    if stage == "vsvf":
        t0 = Trainer(_cfg(tmp_path / "init", val_per_volume=0), vols)
        torch.save(t0.checkpoint(0), tmp_path / "init.pt")
        init = str(tmp_path / "init.pt")
    full = Trainer(_cfg(tmp_path / "full", stage=stage, epochs=2, init_from=init, single_step_epochs=1), vols)
    full.fit()
    part = Trainer(_cfg(tmp_path / "part", stage=stage, epochs=1, init_from=init, single_step_epochs=1), vols)
    part.fit()
    ck = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert ck["epoch"] == 0 and "rng" in ck and "versions" in ck and ck["train_config"]["stage"] == stage
    resumed = Trainer(_cfg(tmp_path / "part", stage=stage, epochs=2, init_from=init, single_step_epochs=1,
                           resume=str(tmp_path / "part" / "last.pt")), vols)
    assert resumed.start_epoch == 1
    resumed.fit()
    a = _step_losses(tmp_path / "full" / "metrics.jsonl")
    b = _step_losses(tmp_path / "part" / "metrics.jsonl")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    m1 = load_model_file(tmp_path / "full" / "last.pt")
    m2 = load_model_file(tmp_path / "part" / "last.pt")
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-7, msg=k)
    epochs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert "val_dice" in epochs[-1] and 0.0 <= epochs[-1]["val_dice"] <= 1.0


def test_export_and_cli(tmp_path: Path) -> None:
    from avsm.cli.main import main
    from avsm.io.geometry import Grid
    from avsm.io.image import Volume, save_image

    vols = synthetic_volumes()
    data = tmp_path / "prep"
    data.mkdir()
    grid = Grid((32, 32, 32), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    entries = []
    for v in vols:
        save_image(Volume(v.image[0, 0].numpy(), grid), data / f"{v.name}.nii.gz")
        save_image(Volume(v.labels[0, 0].numpy().astype("uint8"), grid, None, True),  # type: ignore[union-attr]
                   data / f"{v.name}_labels.nii.gz")
        entries.append({"name": v.name, "subject": v.name, "image": f"{v.name}.nii.gz",
                        "labels": f"{v.name}_labels.nii.gz"})
    (data / "manifest.json").write_text(json.dumps({"volumes": entries}))
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--iters-per-epoch", "1",
               "--threads", "1", "--model", json.dumps(TINY), "--no-augment"])
    assert rc == 0 and (out / "last.pt").is_file() and (out / "best.pt").is_file()
    dest = export_weights(out / "best.pt", tmp_path / "w" / "m.pt", meta={"note": "test"})
    assert dest.stat().st_size < 20e6 and dest.with_suffix(".json").is_file()
    assert load_model_file(dest).config.unet_base == 4
    assert main(["train", "--export", str(out / "last.pt"), "--to", str(tmp_path / "w2.pt")]) == 0
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert main(["train", "--data", str(data), "--model", "{oops"]) == 2
    with pytest.raises(AvsmError):
        Trainer(_cfg(tmp_path / "x", stage="bogus"), vols)


def _step_field(path: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in path.read_text().splitlines() if json.loads(line)["kind"] == "step"]


def test_affine_regulariser_and_epoch_survive_init_from_and_resume(tmp_path: Path) -> None:
    """A fine-tune continues the λ_ar schedule (C K / (K + e^{n/K})) where its start left off.

    Two epochs from scratch, then one more from ``--init-from`` its ``last.pt`` (or its exported
    weights), then a resume of that: λ_ar at every step equals one uninterrupted three-epoch run's,
    and the epoch count is read back from the checkpoint and the weights file.
    """
    from avsm.losses.consistency import decaying_weight

    vols = synthetic_volumes()
    kw = dict(val_per_volume=0, single_step_epochs=1, log_every=1)
    straight = Trainer(_cfg(tmp_path / "straight", epochs=3, **kw), vols)
    straight.fit()
    lam_straight = _step_field(tmp_path / "straight" / "metrics.jsonl", "lambda_reg")
    assert len(lam_straight) == 6
    assert lam_straight[0] == pytest.approx(decaying_weight(0.0, 10.0, 4.0), rel=1e-6)

    first = Trainer(_cfg(tmp_path / "first", epochs=2, **kw), vols)
    first.fit()
    assert load_model_file(tmp_path / "first" / "last.pt").trained_epochs == {"affine": 2.0}
    export_weights(tmp_path / "first" / "last.pt", tmp_path / "w.pt")
    assert load_model_file(tmp_path / "w.pt").trained_epochs == {"affine": 2.0}  # the export keeps it

    tune = Trainer(_cfg(tmp_path / "tune", epochs=1, init_from=str(tmp_path / "w.pt"), **kw), vols)
    assert tune.epoch_offset == 2.0 and tune.affine_steps(0) is None  # the single-step phase is over
    tune.fit()
    lam_tune = _step_field(tmp_path / "tune" / "metrics.jsonl", "lambda_reg")
    assert lam_tune == pytest.approx(lam_straight[4:], rel=1e-6)
    assert lam_tune[0] == pytest.approx(decaying_weight(2.0, 10.0, 4.0)) and lam_tune[0] < lam_straight[0] - 0.5
    assert load_model_file(tmp_path / "tune" / "last.pt").trained_epochs == {"affine": 3.0}

    # a resume of a fine-tune keeps its offset: epoch 1 of the resumed run is schedule epoch 3
    resumed = Trainer(_cfg(tmp_path / "tune", epochs=2, init_from=str(tmp_path / "w.pt"),
                           resume=str(tmp_path / "tune" / "last.pt"), **kw), vols)
    assert resumed.start_epoch == 1 and resumed.epoch_offset == 2.0
    resumed.fit()
    lam_all = _step_field(tmp_path / "tune" / "metrics.jsonl", "lambda_reg")
    assert lam_all[2:] == pytest.approx([decaying_weight(3.0, 10.0, 4.0), decaying_weight(3.5, 10.0, 4.0)],
                                        rel=1e-6)
    assert load_model_file(tmp_path / "tune" / "last.pt").trained_epochs == {"affine": 4.0}
    # the vSVF stage has its own clock: starting it from the affine result starts at 0
    v = Trainer(_cfg(tmp_path / "v", stage="vsvf", epochs=1, init_from=str(tmp_path / "w.pt"), **kw), vols)
    assert v.epoch_offset == 0.0
