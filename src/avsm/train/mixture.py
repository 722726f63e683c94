"""The training mixture of real and synthesised pairs (:class:`avsm.train.data.MixedPairs`).

Sources, by name (weights in :attr:`avsm.train.trainer.TrainConfig.sources`):

``ixi``
    real cross-subject pairs of the IXI training subjects (:class:`avsm.train.data.CohortPairs`):
    whole head and skull-stripped, independently augmented, posed and initialised;
``synthseg``
    images synthesised from the 20 SynthSeg label maps of real heads (whole head or, with
    probability ½, skull-stripped by dropping the non-brain labels);
``synth-ixi``
    images synthesised from the IXI training subjects' DLMUSE parcellations (brain only: the
    parcellation has no extra-cerebral labels).

Validation uses held-out IXI subjects only (:func:`avsm.train.cohort.split_held_out`, the
validation half); the test half and OASIS-TRT-20 are for the benchmarks.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avsm.errors import AvsmError
from avsm.train.augment import AugmentConfig
from avsm.train.cohort import (
    check_training_sources,
    ixi_subjects,
    split_held_out,
    split_subjects,
)
from avsm.train.data import (
    CohortPairs,
    CohortVolume,
    MixedPairs,
    PoseConfig,
    PosedSynthPairs,
    cohort_validation_pairs,
    prepare_cohort,
)
from avsm.train.synth import SynthConfig, SynthPairs, load_label_maps

__all__ = ["SOURCES", "build_mixture", "build_validation", "synthseg_maps", "training_subjects"]

log = logging.getLogger(__name__)

SOURCES = ("ixi", "synthseg", "synth-ixi")

#: working shape of the SynthSeg label maps (256³ at 1 mm → the api's working grid at ~4 mm)
SYNTHSEG_SHAPE = (64, 64, 64)


def training_subjects(shared: str | os.PathLike[str], limit: int = 0) -> list[Any]:
    """The IXI training subjects (all but the held-out split), the first ``limit`` if > 0."""
    train, _ = split_subjects(ixi_subjects(Path(shared) / "ixi185"))
    return train[:limit] if limit > 0 else train


def synthseg_maps(shared: str | os.PathLike[str], cache: str | os.PathLike[str] | None) -> list[torch.Tensor]:
    """The SynthSeg training label maps at :data:`SYNTHSEG_SHAPE` (cached as one ``.npz``)."""
    folder = Path(shared) / "synthseg-label-maps"
    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii", ".mgz")))
    if not paths:
        raise AvsmError("no label maps", folder)
    check_training_sources(paths)
    key = hashlib.sha1(("|".join(p.name for p in paths) + str(SYNTHSEG_SHAPE)).encode()).hexdigest()[:12]
    cpath = Path(cache) / f"synthseg_{key}.npz" if cache is not None else None
    if cpath is not None and cpath.is_file():
        z = np.load(cpath)["maps"]
        return [torch.from_numpy(z[k].astype(np.int64))[None, None] for k in range(z.shape[0])]
    maps = load_label_maps(paths, SYNTHSEG_SHAPE)
    if cpath is not None:
        cpath.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cpath, maps=np.stack([m[0, 0].numpy().astype(np.int16) for m in maps]))
    return maps


def build_mixture(sources: Mapping[str, float], shared: str | os.PathLike[str], spacing: float, length: int,
                  *, seed: int = 0, cache: str | os.PathLike[str] | None = None,
                  augment: AugmentConfig | None = None, pose: PoseConfig | None = None,
                  synth: SynthConfig | None = None, subjects_limit: int = 0,
                  cohort: list[CohortVolume] | None = None) -> MixedPairs:
    """The mixture of the named ``sources`` (see module doc) with their weights.

    Raises:
        AvsmError: an unknown source name.
    """
    unknown = [k for k in sources if k not in SOURCES]
    if unknown:
        raise AvsmError(f"unknown training source(s) {unknown}; choose among {', '.join(SOURCES)}")
    need_cohort = any(sources.get(k, 0) > 0 for k in ("ixi", "synth-ixi"))
    if need_cohort and cohort is None:
        cohort = prepare_cohort(training_subjects(shared, subjects_limit), spacing, cache)
    parts: list[Dataset] = []
    weights: list[float] = []
    for name, w in sources.items():
        if w <= 0:
            continue
        if name == "ixi":
            assert cohort is not None
            ds: Dataset = CohortPairs(cohort, length, seed=seed, augment_config=augment or AugmentConfig(), pose=pose)
        elif name == "synthseg":
            ds = PosedSynthPairs(SynthPairs(synthseg_maps(shared, cache), synth, seed=seed + 1, length=length),
                                 spacing, seed=seed, pose=pose, name=name)
        else:
            assert cohort is not None
            maps = [v.labels.to(torch.int64) for v in cohort]
            ds = PosedSynthPairs(SynthPairs(maps, synth, seed=seed + 2, length=length), spacing, seed=seed + 3,
                                 pose=pose, name=name)
        parts.append(ds)
        weights.append(float(w))
    log.info("training mixture: %s", ", ".join(f"{k} {v:g}" for k, v in sources.items() if v > 0))
    return MixedPairs(parts, weights, length, seed=seed)


def build_validation(shared: str | os.PathLike[str], spacing: float, n: int, *,
                     cache: str | os.PathLike[str] | None = None, pose: PoseConfig | None = None
                     ) -> list[dict[str, Any]]:
    """``n`` fixed validation pairs of the held-out IXI validation subjects (half whole head, half stripped)."""
    _, held = split_subjects(ixi_subjects(Path(shared) / "ixi185"))
    val, _ = split_held_out(held)
    return cohort_validation_pairs(prepare_cohort(val, spacing, cache), n, pose=pose)
