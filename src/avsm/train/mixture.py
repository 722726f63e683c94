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
    parcellation has no extra-cerebral labels);
``ixi-aligned``
    real cross-subject IXI pairs pre-aligned by composed template affines (each subject
    registered once to the MNI 2009a template; :class:`avsm.train.prealign.AlignedPairs`), one
    resampling per image: the vSVF network's setting in the paper;
``distill``
    a fixed set of ``ixi-aligned`` pairs with vSVF-opt's maps as supervised targets
    (:class:`avsm.train.prealign.DistillPairs`, weight ``distill_weight``).

The last two (:data:`PREALIGNED_SOURCES`) train the vSVF stage without the affine network, and
validation then uses pre-aligned held-out pairs too.

Validation uses held-out IXI subjects only (:func:`avsm.train.cohort.split_held_out`, the
validation half); the test half and OASIS-TRT-20 are for the benchmarks.
"""

from __future__ import annotations

import functools
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
    half_and_half,
    prepare_cohort,
)
from avsm.train.synth import SynthConfig, SynthPairs, load_label_maps

__all__ = ["PREALIGNED_SOURCES", "SOURCES", "TEMPLATE", "build_mixture", "build_validation", "synthseg_maps",
           "template_volume", "training_subjects"]

log = logging.getLogger(__name__)

SOURCES = ("ixi", "synthseg", "synth-ixi", "ixi-aligned", "distill")
#: sources whose pairs are pre-aligned by template affines (no affine network in training)
PREALIGNED_SOURCES = ("ixi-aligned", "distill")
#: the template of the pre-alignment (BSD-3, allowed for training: ../shared/data/README.md)
TEMPLATE = "mni2009a_t1.nii.gz"
#: its grey- and white-matter probability maps (0..255), which strip it
TEMPLATE_TISSUES = ("mni2009a_gm_prob.nii.gz", "mni2009a_wm_prob.nii.gz")

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


@functools.lru_cache(maxsize=2)
def template_volume(shared: str | os.PathLike[str], spacing: float) -> tuple[torch.Tensor, np.ndarray]:
    """The pre-alignment template, skull-stripped, on its working grid at ``spacing`` mm:
    ``((1, 1, D, H, W), unit → world)``.

    The brain is the template's grey + white matter probability above 0.3, closed and filled
    (:func:`avsm.train.data.brain_mask`'s operations); subjects are registered to it by their
    stripped brains: on whole heads the neck and the field of view pulled 5 of 60 IXI subjects'
    affines off (rotation > 30° or a scale beyond e^±0.3), brain to brain 1 of 60 (the same test;
    :func:`avsm.train.prealign.plausible_affine` leaves out beyond 30° or e^±0.4).  Built once per
    ``(shared, spacing)`` in a process (the training sources and the validation share it; do not
    modify the returned tensor).
    """
    from avsm.io.image import load_image
    from avsm.io.working import to_working, working_grid_for
    from avsm.train.data import brain_mask

    paths = [Path(shared) / n for n in (TEMPLATE, *TEMPLATE_TISSUES)]
    check_training_sources(paths)
    img, gm, wm = (load_image(p) for p in paths)
    tissue = (np.asarray(gm.array, dtype=np.float32) + np.asarray(wm.array, dtype=np.float32)) / 255.0
    mask = brain_mask((tissue > 0.3).astype(np.int16), img.grid.spacing)
    grid = working_grid_for(img.grid, spacing=spacing)
    return torch.from_numpy(to_working(img.with_array(img.array * mask), grid))[None, None], grid.unit_to_world()


_Aligned = tuple[list[CohortVolume], list[tuple[torch.Tensor, torch.Tensor]]]


def _template_aligned(volumes: list[CohortVolume], shared: str | os.PathLike[str], spacing: float,
                      cache: str | os.PathLike[str] | None) -> _Aligned:
    """The subjects with a plausible template affine, and those affines (the others logged, left out)."""
    from avsm.train.prealign import plausible_affine, template_affines  # local: pre-aligned runs only

    tpl, tpl_u2w = template_volume(shared, spacing)
    affines = template_affines(volumes, tpl, tpl_u2w, cache=cache)
    keep = [k for k, (v, T) in enumerate(zip(volumes, affines)) if plausible_affine(T, v.unit_to_world, tpl_u2w)]
    if len(keep) < len(volumes):
        log.warning("template affines: %d of %d subjects implausible (left out): %s", len(volumes) - len(keep),
                    len(volumes), ", ".join(v.subject for k, v in enumerate(volumes) if k not in keep))
    return [volumes[k] for k in keep], [affines[k] for k in keep]


def _aligned(aligned: _Aligned, length: int, *, seed: int, augment: AugmentConfig | None,
             p_strip: float = 0.5) -> Any:
    from avsm.train.prealign import AlignConfig, AlignedPairs  # local: pre-aligned runs only

    cfg = AlignConfig(shared=augment or AlignConfig().shared, p_strip=p_strip)
    return AlignedPairs(*aligned, length, seed=seed, config=cfg, augment=augment is not None)


def build_mixture(sources: Mapping[str, float], shared: str | os.PathLike[str], spacing: float, length: int,
                  *, seed: int = 0, cache: str | os.PathLike[str] | None = None,
                  augment: AugmentConfig | None = None, pose: PoseConfig | None = None,
                  synth: SynthConfig | None = None, subjects_limit: int = 0,
                  cohort: list[CohortVolume] | None = None, model_config: Any = None,
                  distill_pairs: int = 64) -> MixedPairs:
    """The mixture of the named ``sources`` (see module doc) with their weights.

    ``model_config`` (an :class:`avsm.models.avsm.AVSMConfig`) sets the kernel and integrator of
    the ``distill`` targets; ``distill_pairs`` their number.

    Raises:
        AvsmError: an unknown source name, or pre-aligned sources mixed with posed ones.
    """
    unknown = [k for k in sources if k not in SOURCES]
    if unknown:
        raise AvsmError(f"unknown training source(s) {unknown}; choose among {', '.join(SOURCES)}")
    active = [k for k, w in sources.items() if w > 0]
    if any(k in PREALIGNED_SOURCES for k in active) and not all(k in PREALIGNED_SOURCES for k in active):
        raise AvsmError("pre-aligned sources (ixi-aligned, distill) cannot be mixed with posed ones "
                        f"(the affine network runs on one and not the other): {', '.join(active)}")
    if "distill" in active and "ixi-aligned" in active:
        raise AvsmError("train 'distill' (the supervised warm start) and 'ixi-aligned' in two runs "
                        "(--init-from the first): their items differ")
    need_cohort = any(sources.get(k, 0) > 0 for k in ("ixi", "synth-ixi", "ixi-aligned", "distill"))
    if need_cohort and cohort is None:
        cohort = prepare_cohort(training_subjects(shared, subjects_limit), spacing, cache)
    aligned = _template_aligned(cohort, shared, spacing, cache) if any(
        k in PREALIGNED_SOURCES for k in active) else None  # type: ignore[arg-type]
    parts: list[Dataset] = []
    weights: list[float] = []
    for name, w in sources.items():
        if w <= 0:
            continue
        if name == "ixi":
            assert cohort is not None
            ds: Dataset = CohortPairs(cohort, length, seed=seed, augment_config=augment or AugmentConfig(), pose=pose)
        elif name == "ixi-aligned":
            assert aligned is not None
            # --augmentation is the shared augmentation ψ of both sides (it keeps the pair aligned)
            ds = _aligned(aligned, length, seed=seed, augment=augment)
        elif name == "distill":
            from avsm.models.avsm import AVSMConfig
            from avsm.train.prealign import DistillPairs, distillation_config

            assert aligned is not None
            fixed_set = _aligned(aligned, distill_pairs, seed=seed + 5, augment=None)
            ds = DistillPairs(fixed_set, distill_pairs, distillation_config(model_config or AVSMConfig()),
                              cache=cache)
            ds.prepare()
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
                     cache: str | os.PathLike[str] | None = None, pose: PoseConfig | None = None,
                     prealigned: bool = False) -> list[dict[str, Any]]:
    """``n`` fixed validation pairs of the held-out IXI validation subjects (half whole head, half
    stripped); ``prealigned``: pre-aligned by their template affines instead of posed and initialised."""
    _, held = split_subjects(ixi_subjects(Path(shared) / "ixi185"))
    val, _ = split_held_out(held)
    vols = prepare_cohort(val, spacing, cache)
    if not prealigned:
        return cohort_validation_pairs(vols, n, pose=pose)
    # half whole head, half stripped, as the posed validation pairs
    aligned = _template_aligned(vols, shared, spacing, cache)
    whole = _aligned(aligned, n, seed=12345, augment=None, p_strip=0.0)
    brain = _aligned(aligned, n, seed=12346, augment=None, p_strip=1.0)
    return half_and_half(whole, brain, n, prefix="aligned-")
