"""Training data: prepared volumes, the real IXI cohort, and random (posed, initialised) pairs of them.

Two kinds of source:

*Prepared folders* (the first bundled model) hold volumes on one common working grid;
:class:`PairDataset` pairs them with synthetic misalignment.

*The real cohort* (:func:`prepare_cohort`, :class:`CohortPairs`): each IXI subject on its own
working grid at the model's spacing, exactly as :func:`avsm.api.prepare_pair` brings an input
there (percentiles → [0, 1], anti-aliased resampling), in two variants: the whole head as
scanned and skull-stripped (the T1 times a brain mask from its DLMUSE labels).  A pair is two
different subjects, each independently augmented; the moving image is then **posed** by a
large random affine and brought back by the **automatic initialisation** of inference
(:func:`avsm.optim.initialise.initial_affine`, ``auto``): :func:`pose_and_initialise`.  So the
networks see what they see at inference: a moving image resampled through the initial affine
onto the fixed working grid, with whatever residual pose the initialisation leaves.

A *prepared folder* (written by ``scripts/prepare_training_data.py``) holds
``manifest.json``::

    {"grid": {...}, "spacing": 3.2,
     "volumes": [{"name": "mni6", "subject": "mni6", "image": "mni6.nii.gz",
                  "labels": "mni6_labels.nii.gz" | null}, ...]}

All images are on the same working grid (intensities normalised to [0, 1]
exactly as :func:`avsm.io.working.to_working` does at inference), so any two of them
form a pair.  :class:`PairDataset` yields augmented pairs whose randomness
is a pure function of ``(seed, epoch, index)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avsm.core.coords import affine_map
from avsm.core.sampling import warp
from avsm.errors import AvsmError
from avsm.io.image import load_image, normalize_intensity, resample
from avsm.io.working import to_working, working_grid_for
from avsm.optim.initialise import initial_affine
from avsm.train.augment import (
    AugmentConfig,
    augment_intensity,
    augment_volume,
    random_map,
)
from avsm.train.cohort import Subject, check_training_sources

log = logging.getLogger(__name__)


@dataclass
class VolumeRecord:
    """One prepared volume: ``image`` ``(1, 1, D, H, W)`` float32, optional integer ``labels``."""

    name: str
    subject: str
    image: torch.Tensor
    labels: torch.Tensor | None


def load_prepared(folder: str | Path) -> list[VolumeRecord]:
    """Read a prepared folder (see module doc).

    Raises:
        AvsmError: no manifest, a missing file, or volumes on different grids.
    """
    folder = Path(folder)
    man = folder / "manifest.json"
    if not man.is_file():
        raise AvsmError("no manifest.json: not a prepared training folder "
                        "(run scripts/prepare_training_data.py)", folder)
    meta = json.loads(man.read_text())
    out: list[VolumeRecord] = []
    shape: tuple[int, ...] | None = None
    for v in meta["volumes"]:
        img = load_image(folder / v["image"])
        arr = torch.from_numpy(np.ascontiguousarray(img.array, dtype=np.float32))[None, None]
        lab = None
        if v.get("labels"):
            lv = load_image(folder / v["labels"], label=True)
            lab = torch.from_numpy(np.ascontiguousarray(lv.array).astype(np.int64))[None, None]
        if shape is None:
            shape = tuple(arr.shape)
        elif tuple(arr.shape) != shape:
            raise AvsmError(f"volume {v['name']} has shape {tuple(arr.shape)}, expected {shape}", folder)
        out.append(VolumeRecord(v["name"], v.get("subject", v["name"]), arr, lab))
    if not out:
        raise AvsmError("the manifest lists no volumes", folder)
    return out


def all_pairs(n: int, *, same_subject: bool = True) -> list[tuple[int, int]]:
    """Ordered pairs ``(moving, fixed)`` of ``n`` volumes, with ``(i, i)`` when ``same_subject``."""
    return [(i, j) for i in range(n) for j in range(n) if same_subject or i != j]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed of one sample."""
    return int((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class EpochDataset(Dataset):
    """``length`` random items per epoch; item ``i`` of epoch ``e`` is a pure function of
    :func:`sample_seed` ``(seed + salt, e, i)`` (:meth:`generator`), so a resumed run redraws
    exactly what the uninterrupted run drew."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes every item's randomness)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int, salt: int = 0) -> torch.Generator:
        """The generator of item ``index`` in the current epoch."""
        return torch.Generator().manual_seed(sample_seed(self.seed + salt, self.epoch, int(index)))


class PairDataset(EpochDataset):
    """Random augmented pairs.

    Item ``i`` of epoch ``e`` uses pair ``pairs[i % len(pairs)]`` and a generator
    seeded with :func:`sample_seed` ``(seed, e, i)``.

    Args:
        volumes: prepared volumes (same grid).
        length: items per epoch.
        pairs: ``(moving, fixed)`` indices; default :func:`all_pairs`.
        augment: random spatial + intensity augmentation (on by default); off
            gives the raw pair.
        augment_config: ranges.
        seed: base seed.

    Items are dicts ``{"moving": (1, D, H, W), "fixed": (1, D, H, W), "pair": (2,)}``
    plus ``moving_labels``/``fixed_labels`` when both volumes have labels.
    """

    def __init__(
        self,
        volumes: Sequence[VolumeRecord],
        length: int,
        *,
        pairs: Sequence[tuple[int, int]] | None = None,
        augment: bool = True,
        augment_config: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(length, seed)
        self.volumes = list(volumes)
        self.pairs = list(pairs) if pairs is not None else all_pairs(len(self.volumes))
        self.augment = augment
        self.cfg = augment_config or AugmentConfig()

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.pairs[index % len(self.pairs)]
        g = self.generator(index)
        vm, vf = self.volumes[i], self.volumes[j]
        with torch.no_grad():
            if self.augment:
                m, ml = augment_volume(vm.image, vm.labels, g, self.cfg)
                f, fl = augment_volume(vf.image, vf.labels, g, self.cfg)
            else:
                m, ml, f, fl = vm.image, vm.labels, vf.image, vf.labels
        item: dict[str, Any] = {"moving": m[0].float(), "fixed": f[0].float(),
                                "pair": torch.tensor([i, j])}
        if ml is not None and fl is not None and vm.subject == vf.subject:
            item["moving_labels"] = ml[0]
            item["fixed_labels"] = fl[0]
        return item


def validation_pairs(volumes: Sequence[VolumeRecord], per_volume: int = 1, *, seed: int = 12345,
                     augment_config: AugmentConfig | None = None) -> list[dict[str, Any]]:
    """Fixed same-subject validation pairs with labels (two independent augmentations each).

    Cross-subject pairs have no common label protocol here, so only volumes
    with labels contribute.  Returns items shaped like :class:`PairDataset`'s.
    """
    cfg = augment_config or AugmentConfig()
    out: list[dict[str, Any]] = []
    for k, v in enumerate(volumes):
        if v.labels is None:
            continue
        for r in range(per_volume):
            g = torch.Generator().manual_seed(sample_seed(seed, k, r))
            m, ml = augment_volume(v.image, v.labels, g, cfg)
            f, fl = augment_volume(v.image, v.labels, g, cfg)
            out.append({"moving": m[0], "fixed": f[0], "moving_labels": ml[0],  # type: ignore[index]
                        "fixed_labels": fl[0], "pair": torch.tensor([k, k]), "name": v.name})  # type: ignore[index]
    return out


# --------------------------------------------------------------------------- real cohort


@dataclass
class CohortVolume:
    """One cohort subject on its own working grid.

    Attributes:
        subject: subject ID.
        whole: ``(1, 1, D, H, W)`` float32 whole-head image in [0, 1].
        brain: the same, skull-stripped (normalised on its own, as an input would be).
        labels: ``(1, 1, D, H, W)`` int16 parcellation (nearest neighbour), 0 = background.
        unit_to_world: ``(4, 4)`` float64 unit coordinates → world (LPS mm) of the working grid.
    """

    subject: str
    whole: torch.Tensor
    brain: torch.Tensor
    labels: torch.Tensor
    unit_to_world: np.ndarray


def brain_mask(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Brain mask of a parcellation: labels > 0, closed (radius 1 voxel), holes filled (uint8)."""
    import SimpleITK as sitk  # local: only preparation needs it

    m = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    m.SetSpacing(tuple(float(s) for s in spacing))
    m = sitk.BinaryMorphologicalClosing(m, [1, 1, 1])
    m = sitk.BinaryFillhole(m)
    return sitk.GetArrayFromImage(m).astype(np.uint8)


def prepare_subject(subject: Subject, spacing: float) -> CohortVolume:
    """Bring one subject (T1 + labels) onto its working grid at ``spacing`` mm (see module doc).

    Raises:
        AvsmError: the subject has no labels, or a file cannot be read.
    """
    if subject.labels is None:
        raise AvsmError("cohort subject has no label map", subject.image)
    check_training_sources([subject.image, subject.labels])
    img = load_image(subject.image)
    lab = load_image(subject.labels, label=True)
    grid = working_grid_for(img.grid, spacing=spacing)
    whole = to_working(img, grid)
    mask = brain_mask(np.asarray(lab.array), lab.grid.spacing)
    brain = to_working(img.with_array(img.array * mask), grid)
    labels = resample(lab, grid, interpolation="nearest").array.astype(np.int16)
    return CohortVolume(subject.id, torch.from_numpy(whole)[None, None], torch.from_numpy(brain)[None, None],
                        torch.from_numpy(np.ascontiguousarray(labels))[None, None], grid.unit_to_world())


def prepare_cohort(subjects: Sequence[Subject], spacing: float, cache: str | os.PathLike[str] | None = None
                   ) -> list[CohortVolume]:
    """:func:`prepare_subject` for every subject, cached in ``cache`` (one ``.npz`` per subject and spacing)."""
    out = []
    for s in subjects:
        path = None
        if cache is not None:
            key = hashlib.sha1(f"{s.image}|{s.labels}|{spacing:.4f}|v1".encode()).hexdigest()[:12]
            path = Path(cache) / f"{s.id}_{key}.npz"
            if path.is_file():
                z = np.load(path)
                out.append(CohortVolume(s.id, torch.from_numpy(z["whole"]), torch.from_numpy(z["brain"]),
                                        torch.from_numpy(z["labels"]), z["u2w"]))
                continue
        v = prepare_subject(s, spacing)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, whole=v.whole.numpy(), brain=v.brain.numpy(), labels=v.labels.numpy(),
                     u2w=v.unit_to_world)
            os.replace(tmp, path)
        out.append(v)
    log.info("cohort: %d subjects at %.2f mm", len(out), spacing)
    return out


@dataclass(frozen=True)
class PoseConfig:
    """The large random pose given to a moving image before the automatic initialisation.

    A pose is where the head lies in the scanner: rotation and translation.  Scale and shear are
    the anatomy's, and real cross-subject pairs already carry them: between 59 IXI training
    subjects (3 422 pairs, ``benchmarks/pose_ranges.py``) the largest |log-scale| of a pair's affine
    is 0.088 at the median and 0.14 at the 90th percentile, the largest shear 0.023 and 0.048,
    the rotation 7° and 15°.  So the pose adds only a little scale and shear (until 2026-12 it
    added up to 0.15 and 0.05, doubling the real scale range; ``scripts/train_cohort.sh`` keeps
    those for the bundled model's run).

    Attributes:
        rotation_deg, scale, shear, translation: ranges as :class:`AugmentConfig`'s
            (translation in unit coordinates of the moving working grid).
        p_pose: probability that a pair is posed at all.
        random_strength: scale the ranges by ``s ~ U(0, 1)`` per pair.
        init: initialisation mode (inference's default ``auto``; ``header`` skips it).
    """

    rotation_deg: float = 25.0
    scale: float = 0.03
    shear: float = 0.01
    translation: float = 0.15
    p_pose: float = 0.9
    random_strength: bool = True
    init: str = "auto"


def pose_and_initialise(moving: torch.Tensor, moving_labels: torch.Tensor | None, moving_u2w: np.ndarray,
                        fixed: torch.Tensor, fixed_u2w: np.ndarray, g: torch.Generator, cfg: PoseConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Pose the moving image at random, initialise as inference does, resample onto the fixed grid.

    Args:
        moving: ``(1, 1, d, h, w)`` in [0, 1] on its working grid; ``moving_labels`` likewise (integer).
        moving_u2w, fixed_u2w: ``(4, 4)`` unit → world of the two working grids.
        fixed: ``(1, 1, D, H, W)``.
        g: the only source of randomness.

    Returns:
        ``(moving on the fixed grid, its labels, the chosen initialisation)``.
    """
    shape = tuple(int(s) for s in moving.shape[2:])
    if float(torch.rand((), generator=g)) < cfg.p_pose:
        k = float(torch.rand((), generator=g)) if cfg.random_strength else 1.0
        acfg = AugmentConfig(rotation_deg=k * cfg.rotation_deg, scale=k * cfg.scale, shear=k * cfg.shear,
                             translation=k * cfg.translation, p_affine=1.0, p_warp=0.0)
        phi = random_map(g, shape, acfg, deform=False)  # type: ignore[arg-type]
        moving = warp(moving, phi)
        if moving_labels is not None:
            moving_labels = warp(moving_labels, phi, mode="nearest")
    res = initial_affine(fixed, moving, fixed_u2w, moving_u2w, cfg.init)
    phi0 = affine_map(res.A0, res.b0, tuple(int(s) for s in fixed.shape[2:]))
    out = warp(moving, phi0)
    lab = warp(moving_labels, phi0, mode="nearest") if moving_labels is not None else None
    return out, lab, res.chosen


STRIP_MODES = ("random", "whole", "brain")


def draw_pair(g: torch.Generator, n: int) -> tuple[int, int]:
    """Two different indices ``(moving, fixed)`` among ``n``, uniformly, from ``g``."""
    i = int(torch.randint(n, (), generator=g))
    j = int(torch.randint(n - 1, (), generator=g))
    return i, j + int(j >= i)


def half_and_half(whole: Sequence[dict[str, Any]], brain: Sequence[dict[str, Any]], n: int,
                  prefix: str = "") -> list[dict[str, Any]]:
    """``n`` validation items: ``whole[k]`` for ``k < n // 2``, then ``brain[k]``, named
    ``<prefix>whole<k>`` / ``<prefix>brain<k>``."""
    out = []
    for k in range(n):
        item = (whole if k < n // 2 else brain)[k]
        item["name"] = f"{prefix}{'whole' if k < n // 2 else 'brain'}{k}"
        out.append(item)
    return out


class CohortPairs(EpochDataset):
    """Cross-subject pairs of the real cohort, posed and initialised (see module doc).

    Item ``i`` of epoch ``e`` draws from a generator seeded with :func:`sample_seed`
    ``(seed, e, i)``: two different subjects; whole head or skull-stripped (``strip``:
    ``random`` draws it per pair, shared by both sides with probability ``p_same_strip``,
    stripped with probability ``p_strip``); an independent augmentation of each side
    (``augment_config``, ``None``: none); then :func:`pose_and_initialise`.

    Items: ``{"moving", "fixed": (1, D, H, W) float32 on the fixed grid, "moving_labels",
    "fixed_labels": (1, D, H, W) int64, "pair": (2,), "source": str}``.
    """

    def __init__(self, volumes: Sequence[CohortVolume], length: int, *, seed: int = 0,
                 augment_config: AugmentConfig | None = None, pose: PoseConfig | None = None,
                 strip: str = "random", p_strip: float = 0.5, p_same_strip: float = 0.8) -> None:
        if len(volumes) < 2:
            raise ValueError("CohortPairs needs at least two subjects")
        if strip not in STRIP_MODES:
            raise ValueError(f"strip must be one of {STRIP_MODES}, got {strip!r}")
        super().__init__(length, seed)
        self.volumes = list(volumes)
        self.cfg = augment_config
        self.pose = pose if pose is not None else PoseConfig()
        self.strip, self.p_strip, self.p_same_strip = strip, float(p_strip), float(p_same_strip)

    def _strips(self, g: torch.Generator) -> tuple[bool, bool]:
        if self.strip != "random":
            return (self.strip == "brain",) * 2  # type: ignore[return-value]
        a = float(torch.rand((), generator=g)) < self.p_strip
        if float(torch.rand((), generator=g)) < self.p_same_strip:
            return a, a
        return a, float(torch.rand((), generator=g)) < self.p_strip

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = self.generator(index)
        i, j = draw_pair(g, len(self.volumes))
        sm, sf = self._strips(g)
        vm, vf = self.volumes[i], self.volumes[j]
        m, ml = (vm.brain if sm else vm.whole), vm.labels.to(torch.int64)
        f, fl = (vf.brain if sf else vf.whole), vf.labels.to(torch.int64)
        with torch.no_grad():
            if self.cfg is not None:
                m, ml = augment_volume(m, ml, g, self.cfg)
                f, fl = augment_volume(f, fl, g, self.cfg)
            m, ml, _ = pose_and_initialise(m, ml, vm.unit_to_world, f, vf.unit_to_world, g, self.pose)
        assert ml is not None and fl is not None
        return {"moving": m[0].float(), "fixed": f[0].float(), "moving_labels": ml[0], "fixed_labels": fl[0],
                "pair": torch.tensor([i, j]), "source": "ixi"}


class PosedSynthPairs(EpochDataset):
    """Synthesised pairs (a :class:`avsm.train.synth.SynthPairs`) made to look like inference inputs:
    each image re-normalised by the inference percentiles, the moving image posed and initialised
    (:func:`pose_and_initialise`) on a working grid of ``spacing`` mm (the label maps' box)."""

    def __init__(self, synth: Dataset, spacing: float, *, seed: int = 0, pose: PoseConfig | None = None,
                 name: str = "synth") -> None:
        super().__init__(len(synth), seed)  # type: ignore[arg-type]
        self.synth = synth
        self.pose = pose if pose is not None else PoseConfig()
        self.name = name
        self.spacing = float(spacing)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of this wrapper and of the synthesiser."""
        super().set_epoch(epoch)
        self.synth.set_epoch(epoch)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.synth[index]
        g = self.generator(index, salt=7919)
        m = torch.from_numpy(normalize_intensity(item["moving"].numpy()))[None].float()
        f = torch.from_numpy(normalize_intensity(item["fixed"].numpy()))[None].float()
        shape = m.shape[2:]
        u2w = np.diag([self.spacing * (s - 1) for s in reversed(shape)] + [1.0])
        with torch.no_grad():
            m, ml, _ = pose_and_initialise(m, item["moving_labels"][None].to(torch.int64), u2w, f, u2w, g, self.pose)
        assert ml is not None
        return {"moving": m[0], "fixed": f[0], "moving_labels": ml[0],
                "fixed_labels": item["fixed_labels"].to(torch.int64), "pair": item["pair"], "source": self.name}


class MixedPairs(EpochDataset):
    """A mixture of pair datasets: item ``i`` of epoch ``e`` comes from source ``k`` with probability
    ``weights[k]`` (drawn from :func:`sample_seed` ``(seed, e, i)``), as that source's item ``i``."""

    def __init__(self, sources: Sequence[Dataset], weights: Sequence[float], length: int, *, seed: int = 0) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("MixedPairs needs one weight per source and at least one source")
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        if (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        super().__init__(length, seed)
        self.sources = list(sources)
        self.weights = w / w.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (of every source too)."""
        super().set_epoch(epoch)
        for s in self.sources:
            s.set_epoch(epoch)  # type: ignore[attr-defined]

    def source_of(self, index: int) -> int:
        """Which source item ``index`` of the current epoch comes from."""
        g = self.generator(index, salt=104729)
        return int(torch.multinomial(self.weights, 1, generator=g))

    def __getitem__(self, index: int) -> dict[str, Any]:
        src = self.sources[self.source_of(index)]
        return src[int(index) % len(src)]  # type: ignore[arg-type]


def cohort_validation_pairs(volumes: Sequence[CohortVolume], n: int, *, seed: int = 12345,
                            pose: PoseConfig | None = None) -> list[dict[str, Any]]:
    """Fixed validation pairs of held-out subjects: ``n // 2`` whole-head then ``n - n // 2``
    skull-stripped, posed and initialised (no other augmentation)."""
    whole = CohortPairs(volumes, n, seed=seed, pose=pose, strip="whole")
    brain = CohortPairs(volumes, n, seed=seed + 1, pose=pose, strip="brain")
    return half_and_half(whole, brain, n)


__all__ = [
    "STRIP_MODES",
    "CohortPairs",
    "CohortVolume",
    "MixedPairs",
    "PairDataset",
    "PoseConfig",
    "PosedSynthPairs",
    "VolumeRecord",
    "all_pairs",
    "augment_intensity",
    "brain_mask",
    "cohort_validation_pairs",
    "draw_pair",
    "half_and_half",
    "load_prepared",
    "pose_and_initialise",
    "prepare_cohort",
    "prepare_subject",
    "sample_seed",
    "validation_pairs",
]
