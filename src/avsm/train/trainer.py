"""Training loop of AVSM: two stages, checkpoints with exact resume, validation Dice, DDP.

Stages (the paper's schedule, shortened):

``affine``
    the multi-step affine network alone; ``single_step_epochs`` epochs with one
    step, then ``config.affine_steps_train`` steps (initialised from the
    single-step weights, i.e. the same run continues).  Loss:
    :meth:`avsm.models.affine.MultiStepAffine.loss` (mk-LNCC, decaying
    identity regulariser, symmetric inverse consistency).
``vsvf``
    the momentum U-Net with the affine network frozen (loaded from the stage-1
    checkpoint ``init_from``).  Loss: :meth:`avsm.models.avsm.AVSM.training_loss`.

Run-time facts:

* an *epoch* is ``iters_per_epoch`` optimiser steps of ``batch_size`` pairs
  (the data set is a few volumes, endlessly re-augmented);
* Adam, ``lr`` halved every ``lr_halve_every`` epochs (StepLR);
* ``<out>/last.pt`` after every epoch (model, optimiser, scheduler, RNG
  states, config, versions), ``<out>/best.pt`` by validation Dice (or loss);
  the starting model is validated first (epoch −1) and is a candidate too,
  so ``best.pt`` is never worse on validation than what training started from;
  ``<out>/metrics.jsonl`` (one JSON object per logged step and per epoch);
* every sample's augmentation is seeded by ``(seed, epoch, index)``, so a run
  resumed from ``last.pt`` reproduces the uninterrupted run;
* DDP when ``WORLD_SIZE > 1`` (``torchrun``): gloo on CPU, nccl on CUDA,
  :class:`DistributedSampler`; rank 0 writes files;
* bf16 autocast on CUDA for the CNNs only (sampling, integration and losses in float32).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from avsm.core.sampling import warp
from avsm.errors import AvsmError
from avsm.metrics.overlap import dice_per_label
from avsm.models.avsm import AVSM, AVSMConfig
from avsm.train.augment import AugmentConfig
from avsm.train.data import (
    PairDataset,
    PoseConfig,
    VolumeRecord,
    load_prepared,
    validation_pairs,
)

log = logging.getLogger(__name__)

STAGES = ("affine", "vsvf")


@dataclass
class TrainConfig:
    """Settings of one training run (stored in every checkpoint).

    Attributes:
        data: prepared folder (``scripts/prepare_training_data.py``).
        out: output folder (checkpoints, metrics).
        stage: ``affine`` or ``vsvf``.
        epochs: number of epochs; ``iters_per_epoch`` optimiser steps each.
        batch_size: pairs per step (per process).
        lr: Adam learning rate; halved every ``lr_halve_every`` epochs.
        seed: base seed (weights, augmentation).
        augment: random augmentation on/off.
        symmetric: symmetric losses (both directions).
        single_step_epochs: affine stage: epochs with one step before multi-step.
        init_from: checkpoint/weights to start from (stage ``vsvf``: the stage-1 result).
        resume: ``last.pt`` to resume exactly.
        val_per_volume: validation pairs per labelled volume (0: none).
        max_minutes: stop (after saving) once this wall time is spent; 0 = no limit.
        device: ``cpu`` / ``cuda`` / ``cuda:N`` (DDP uses the local rank's GPU).
        threads: torch CPU threads (0 = leave the default).
        log_every: steps between metric lines.
        model: :class:`AVSMConfig` fields (a fresh model only).
        augmentation: :class:`AugmentConfig` fields.
        sources: mixture weights of the cohort/synthesis sources (:mod:`avsm.train.mixture`:
            ``ixi``, ``synthseg``, ``synth-ixi``); when given, ``data`` is not used and
            validation is on held-out IXI pairs.
        shared: the shared data folder (``ixi185/``, ``synthseg-label-maps/``).
        spacing: working spacing (mm) of the cohort sources (the model's ``working_spacing``).
        cache: folder for the prepared cohort (``.npz`` per subject).
        subjects_limit: use only the first N IXI training subjects (0: all).
        val_pairs: held-out IXI validation pairs (cohort sources).
        pose: :class:`avsm.train.data.PoseConfig` fields.
        synth: :class:`avsm.train.synth.SynthConfig` fields.
        dice_weight: weight of the Dice term on the warped labels (0: unsupervised only).
        dice_labels: labels per pair in the Dice term.
        distill_weight: weight of the supervised map term against vSVF-opt's targets (source
            ``distill``, :mod:`avsm.train.prealign`).
        distill_pairs: how many fixed training pairs the ``distill`` source holds (targets cached).
    """

    data: str = ""
    out: str = "runs/avsm"
    stage: str = "affine"
    epochs: int = 10
    iters_per_epoch: int = 20
    batch_size: int = 1
    lr: float = 5e-4
    lr_halve_every: int = 60
    seed: int = 0
    augment: bool = True
    symmetric: bool = True
    single_step_epochs: int = 0
    init_from: str | None = None
    resume: str | None = None
    val_per_volume: int = 1
    max_minutes: float = 0.0
    device: str = "cpu"
    threads: int = 0
    log_every: int = 1
    model: dict[str, Any] = field(default_factory=dict)
    augmentation: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, float] = field(default_factory=dict)
    shared: str = "../shared/data"
    spacing: float = 4.2
    cache: str = "runs/cache"
    subjects_limit: int = 0
    val_pairs: int = 12
    pose: dict[str, Any] = field(default_factory=dict)
    synth: dict[str, Any] = field(default_factory=dict)
    dice_weight: float = 0.0
    dice_labels: int = 16
    distill_weight: float = 0.0
    distill_pairs: int = 64


def versions() -> dict[str, str]:
    """Software versions recorded with checkpoints."""
    from avsm import __version__

    return {"avsm": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states."""
    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_model_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> AVSM:
    """Model from a training checkpoint or an exported weights file (both hold ``config`` + ``state_dict``)."""
    p = Path(path)
    if not p.is_file():
        raise AvsmError("model file not found", p)
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:
        raise AvsmError(f"cannot read model file: {e}", p) from e
    if "model" in state and isinstance(state["model"], dict) and "state_dict" in state["model"]:
        state = state["model"]
    if "config" not in state or "state_dict" not in state:
        raise AvsmError("not an avsm model file (no config/state_dict)", p)
    return AVSM.from_state(state)


class _LossModule(nn.Module):
    """``forward`` = :meth:`AVSM.training_loss`, so that DDP sees the real computation."""

    def __init__(self, model: AVSM) -> None:
        super().__init__()
        self.model = model

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, stage: str, epoch: float,
                affine_steps: int | None, symmetric: bool, moving_labels: torch.Tensor | None = None,
                fixed_labels: torch.Tensor | None = None, dice_weight: float = 0.0,
                dice_labels: int = 16, target_map: torch.Tensor | None = None,
                distill_weight: float = 0.0) -> dict[str, torch.Tensor]:
        return self.model.training_loss(moving, fixed, stage=stage, epoch=epoch,
                                        affine_steps=affine_steps, symmetric=symmetric,
                                        moving_labels=moving_labels, fixed_labels=fixed_labels,
                                        dice_weight=dice_weight, dice_labels=dice_labels,
                                        target_map=target_map, distill_weight=distill_weight)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _mean_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    scores = dice_per_label(pred.cpu().numpy(), truth.cpu().numpy())
    vals = [v for v in scores.values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


class Trainer:
    """One training run (see module doc).

    Args:
        cfg: the run's settings.
        volumes: prepared volumes; default :func:`load_prepared` of ``cfg.data``.
    """

    def __init__(self, cfg: TrainConfig, volumes: list[VolumeRecord] | None = None) -> None:
        if cfg.stage not in STAGES:
            raise AvsmError(f"unknown stage {cfg.stage!r}; choose one of {', '.join(STAGES)}")
        self.cfg = cfg
        self.world, self.rank, self.local_rank = _dist_info()
        self.distributed = self.world > 1
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and self.distributed:
            dev = torch.device("cuda", self.local_rank)
        self.device = dev
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        self.out = Path(cfg.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.volumes = volumes if volumes is not None or cfg.sources else load_prepared(cfg.data)
        torch.manual_seed(cfg.seed)
        self.start_epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.model = self._build_model()
        # the stage's schedule clock (affine regulariser, single-step phase) continues from the
        # epochs the starting model was already trained for (``--init-from``); a resume restores it
        self.epoch_offset = float(self.model.trained_epochs.get(cfg.stage, 0.0))
        if self.epoch_offset:
            log.info("%s stage continues its schedule at epoch %g (from %s)", cfg.stage, self.epoch_offset,
                     cfg.init_from)
        self.model.to(self.device)
        self._configure_stage()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=max(cfg.lr_halve_every, 1),
                                                         gamma=0.5)
        if cfg.resume:
            self._load_resume(Path(cfg.resume))
        loss_mod: nn.Module = _LossModule(self.model)
        if self.distributed:
            loss_mod = DistributedDataParallel(
                loss_mod, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.loss_module = loss_mod
        aug = AugmentConfig(**cfg.augmentation)
        length = cfg.iters_per_epoch * cfg.batch_size * self.world
        self.dataset: Any
        # pre-aligned sources (template affines): the pairs are aligned, the affine network is skipped
        from avsm.train.mixture import PREALIGNED_SOURCES  # local: cohort runs only

        self.prealigned = any(w > 0 and k in PREALIGNED_SOURCES for k, w in cfg.sources.items())
        if self.prealigned and cfg.stage != "vsvf":
            raise AvsmError("pre-aligned sources (ixi-aligned, distill) train the vsvf stage only")
        distilling = cfg.sources.get("distill", 0) > 0
        if distilling != (cfg.distill_weight > 0):
            raise AvsmError("--distill-weight > 0 goes with the source 'distill' (its targets) and only with it"
                            if not distilling else "the source 'distill' needs --distill-weight > 0 (the supervised "
                            "term's weight; without it, train on 'ixi-aligned')")
        if cfg.sources:
            from avsm.train.mixture import (  # local: cohort runs only
                build_mixture,
                build_validation,
            )
            from avsm.train.synth import SynthConfig

            pose = PoseConfig(**cfg.pose)
            self.dataset = build_mixture(cfg.sources, cfg.shared, cfg.spacing, length, seed=cfg.seed,
                                         cache=cfg.cache, augment=aug if cfg.augment else None, pose=pose,
                                         synth=SynthConfig(**cfg.synth), subjects_limit=cfg.subjects_limit,
                                         model_config=self.model.config, distill_pairs=cfg.distill_pairs)
        else:
            self.dataset = PairDataset(self.volumes, length, augment=cfg.augment, augment_config=aug,
                                       seed=cfg.seed)
        self.sampler = (DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                           shuffle=True, seed=cfg.seed) if self.distributed else None)
        if cfg.sources:
            self.val = build_validation(cfg.shared, cfg.spacing, cfg.val_pairs, cache=cfg.cache, pose=pose,
                                        prealigned=self.prealigned) if cfg.val_pairs > 0 else []
        else:
            self.val = validation_pairs(self.volumes, cfg.val_per_volume, augment_config=aug) \
                if cfg.val_per_volume > 0 else []

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> AVSM:
        cfg = self.cfg
        if cfg.init_from and not cfg.resume:
            model = load_model_file(cfg.init_from)
            log.info("initialised from %s", cfg.init_from)
            return model
        mc = AVSMConfig.from_dict(cfg.model) if cfg.model else AVSMConfig()
        return AVSM(mc)

    def _configure_stage(self) -> None:
        m = self.model
        if self.cfg.stage == "affine":
            m.freeze_affine(False)
            for p in m.momentum.parameters():
                p.requires_grad_(False)
        else:
            m.freeze_affine(True)
            for p in m.momentum.parameters():
                p.requires_grad_(True)

    def _load_resume(self, path: Path) -> None:
        st = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(st["model"]["state_dict"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.start_epoch = int(st["epoch"]) + 1
        self.global_step = int(st["global_step"])
        self.best = st.get("best")
        self.model.trained_epochs = dict((st["model"].get("meta") or {}).get("trained_epochs") or {})
        # the clock at the checkpoint is epoch_offset + epoch + 1 (see checkpoint); older ones have none: 0
        done = float(self.start_epoch)
        self.epoch_offset = self.model.trained_epochs.get(self.cfg.stage, done) - done
        set_rng_state(st["rng"])
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """Everything needed to resume after ``epoch`` (completed; -1: before the first)."""
        self.model.trained_epochs[self.cfg.stage] = self.epoch_offset + epoch + 1
        return {"model": self.model.export_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "global_step": self.global_step,
                "best": self.best, "rng": rng_state(), "train_config": dataclasses.asdict(self.cfg),
                "stage": self.cfg.stage, "versions": versions()}

    def schedule_epoch(self, epoch: float) -> float:
        """The stage's schedule clock at this run's ``epoch``: ``epoch_offset + epoch``."""
        return self.epoch_offset + epoch

    # ------------------------------------------------------------------ loop

    def affine_steps(self, epoch: int) -> int | None:
        """Affine steps of ``epoch``: 0 on pre-aligned pairs, 1 during the single-step phase, else the config's."""
        if self.prealigned:
            return 0
        if self.cfg.stage == "affine" and self.schedule_epoch(epoch) < self.cfg.single_step_epochs:
            return 1
        return None

    def train_step(self, batch: dict[str, Any], epoch: int, frac: float) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the loss terms as floats."""
        self.model.train()
        m = batch["moving"].to(self.device)
        f = batch["fixed"].to(self.device)
        ml, fl = batch.get("moving_labels"), batch.get("fixed_labels")
        if ml is not None and fl is not None:
            ml, fl = ml.to(self.device), fl.to(self.device)
        tm = batch.get("target_map")
        losses = self.loss_module(m, f, self.cfg.stage, self.schedule_epoch(epoch + frac), self.affine_steps(epoch),
                                  self.cfg.symmetric,
                                  ml, fl, self.cfg.dice_weight, self.cfg.dice_labels,
                                  tm.to(self.device) if tm is not None else None, self.cfg.distill_weight)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        self.global_step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean validation Dice (and its no-registration reference) and loss on the fixed pairs."""
        if not self.val:
            return {}
        self.model.eval()
        dices, base, losses = [], [], []
        n_v = 0 if self.cfg.stage == "affine" else None
        for item in self.val:
            m = item["moving"][None].to(self.device)
            f = item["fixed"][None].to(self.device)
            out = self.model(m, f, affine_steps=0 if self.prealigned else None, vsvf_steps=n_v, with_loss=False)
            lab = warp(item["moving_labels"][None].to(self.device), out.phi, mode="nearest")
            dices.append(_mean_dice(lab[0, 0], item["fixed_labels"][0]))
            base.append(_mean_dice(item["moving_labels"][0], item["fixed_labels"][0]))
            losses.append(float(self.model._sim(out.warped, f)))
        return {"val_dice": float(np.mean(dices)), "val_dice_identity": float(np.mean(base)),
                "val_sim": float(np.mean(losses))}

    def _log(self, rec: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to ``cfg.epochs``; returns the last epoch's record."""
        cfg = self.cfg
        t_start = time.time()
        last: dict[str, Any] = {}
        loader_kw: dict[str, Any] = {"batch_size": cfg.batch_size, "num_workers": 0}
        if self.start_epoch == 0 and self.best is None and self.rank == 0 and self.val:
            # the starting point is a candidate too: best.pt never ends up worse than the init
            val0 = self.validate()
            self._log({"kind": "init", "stage": cfg.stage, "epoch": -1, "step": self.global_step, **val0})
            self.best = float(val0["val_dice"])
            _atomic_save(self.checkpoint(-1), self.out / "best.pt")
        for epoch in range(self.start_epoch, cfg.epochs):
            self.dataset.set_epoch(epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
                loader = DataLoader(self.dataset, sampler=self.sampler, **loader_kw)
            else:
                loader = DataLoader(self.dataset, shuffle=False, **loader_kw)
            sums: dict[str, float] = {}
            n = 0
            t0 = time.time()
            bar = tqdm(loader, desc=f"{cfg.stage} epoch {epoch}", disable=self.rank != 0, leave=False,
                       file=sys.stderr)
            for it, batch in enumerate(bar):
                rec = self.train_step(batch, epoch, it / max(len(loader), 1))
                for k, v in rec.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                bar.set_postfix(loss=f"{rec['total']:.4f}", sim=f"{rec['sim']:.4f}")
                if cfg.log_every and self.global_step % cfg.log_every == 0:
                    self._log({"kind": "step", "stage": cfg.stage, "epoch": epoch, "step": self.global_step,
                               "lr": self.optimizer.param_groups[0]["lr"], **rec})
            self.scheduler.step()
            val = self.validate() if self.rank == 0 else {}
            last = {"kind": "epoch", "stage": cfg.stage, "epoch": epoch, "schedule_epoch": self.schedule_epoch(epoch),
                    "step": self.global_step,
                    "seconds": time.time() - t0, **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}, **val}
            log.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()})
            self._log(last)
            score = val.get("val_dice", -val.get("val_sim", last.get("train_total", 0.0)))
            if self.rank == 0:
                improved = self.best is None or (score is not None and score > self.best)
                if improved:
                    self.best = float(score)
                ck = self.checkpoint(epoch)
                _atomic_save(ck, self.out / "last.pt")
                if improved:
                    _atomic_save(ck, self.out / "best.pt")
            if self.distributed:
                dist.barrier()
            if cfg.max_minutes > 0 and (time.time() - t_start) / 60.0 >= cfg.max_minutes:
                log.info("time budget of %.1f min spent after epoch %d", cfg.max_minutes, epoch)
                break
        return last

    def close(self) -> None:
        """Tear down the process group if this trainer created one."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def export_weights(checkpoint: str | os.PathLike[str], dest: str | os.PathLike[str],
                   meta: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Write a slim weights file (config + state_dict + versions + ``meta``) from a checkpoint.

    ``overrides`` replaces inference-time :class:`AVSMConfig` fields (e.g. the test-time
    step counts chosen on validation pairs); they are recorded in ``meta``.
    """
    model = load_model_file(checkpoint)
    if overrides:
        model.config = AVSMConfig.from_dict({**model.config.to_dict(), **overrides})
    state = model.export_state()
    state["versions"] = versions()
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    info: dict[str, Any] = {"source": Path(checkpoint).name}
    for key in ("epoch", "global_step", "best", "stage", "train_config", "versions"):
        if key in ck:
            info[f"checkpoint_{key}" if key == "versions" else key] = ck[key]
    if overrides:
        info["config_overrides"] = dict(overrides)
    info.update(meta or {})
    state["meta"] = {**(state.get("meta") or {}), **info}  # keeps the domain and trained_epochs
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(state, dest)
    cfg_json = dest.with_suffix(".json")
    cfg_json.write_text(json.dumps({"config": state["config"], "versions": state["versions"],
                                    "meta": state["meta"]}, indent=2))
    return dest


def train(cfg: TrainConfig, volumes: list[VolumeRecord] | None = None) -> dict[str, Any]:
    """Run one training (see :class:`Trainer`); returns the last epoch's record."""
    tr = Trainer(cfg, volumes)
    try:
        return tr.fit()
    finally:
        tr.close()
