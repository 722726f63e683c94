"""The real training cohort: IXI subjects, a fixed held-out split, and what may never be trained on.

``../shared/data/ixi185/`` holds ``<ID>_T1.nii.gz`` whole-head T1s with automatic DLMUSE
parcellations ``<ID>_T1_DLMUSE.nii.gz``.  The split into training and held-out subjects is a
pure function of each subject's ID (SHA-1 of the ID against the held-out fraction), so it does
not depend on the listing order, on which files exist or on a random state, and a subject
never changes side when the cohort grows.

Never trained on: ``oasis-trt20/`` (manual labels, validation only, non-commercial terms) and
the evaluation / demo pair Colin27 and MNI 2009c (:func:`check_training_sources`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from avsm.errors import AvsmError

__all__ = [
    "FORBIDDEN",
    "Subject",
    "check_training_sources",
    "is_held_out",
    "ixi_subjects",
    "split_held_out",
    "split_subjects",
]

#: path parts that must never be a training source (validation-only data, the evaluation pair)
FORBIDDEN: tuple[str, ...] = ("oasis-trt20", "colin27", "mni2009c")

_IXI = re.compile(r"^(IXI\d{3}-[A-Za-z]+-\d{4})_T1\.nii\.gz$")


@dataclass(frozen=True)
class Subject:
    """One cohort subject: ``image`` (T1) and ``labels`` (DLMUSE parcellation, or ``None``)."""

    id: str
    image: str
    labels: str | None


def ixi_subjects(folder: str | os.PathLike[str]) -> list[Subject]:
    """The IXI subjects in ``folder`` (``<ID>_T1.nii.gz`` and, when present, ``<ID>_T1_DLMUSE.nii.gz``).

    Raises:
        AvsmError: the folder does not exist or holds no IXI T1.
    """
    d = Path(folder)
    if not d.is_dir():
        raise AvsmError("IXI folder not found", d)
    out = []
    for p in sorted(d.iterdir()):
        m = _IXI.match(p.name)
        if m:
            lab = d / f"{m.group(1)}_T1_DLMUSE.nii.gz"
            out.append(Subject(m.group(1), str(p), str(lab) if lab.is_file() else None))
    if not out:
        raise AvsmError("no IXI T1 images (<ID>_T1.nii.gz) in folder", d)
    return out


def is_held_out(subject_id: str, fraction: float = 0.15) -> bool:
    """Whether ``subject_id`` belongs to the held-out set: SHA-1 of the ID, as a number in
    [0, 1), below ``fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    h = int.from_bytes(hashlib.sha1(subject_id.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < fraction


def split_subjects(subjects: Sequence[Subject], fraction: float = 0.15) -> tuple[list[Subject], list[Subject]]:
    """``(train, held_out)`` by :func:`is_held_out` (order kept within each part)."""
    held = [s for s in subjects if is_held_out(s.id, fraction)]
    return [s for s in subjects if not is_held_out(s.id, fraction)], held


def split_held_out(held_out: Sequence[Subject]) -> tuple[list[Subject], list[Subject]]:
    """``(validation, test)`` halves of the held-out subjects: by ID order, even positions validate.

    Validation subjects choose checkpoints and the data mixture during training; test subjects
    are only ever used by the benchmarks (``benchmarks/bench_cohort.py``), so nothing is tuned
    on them.
    """
    ordered = sorted(held_out, key=lambda s: s.id)
    return ordered[0::2], ordered[1::2]


def check_training_sources(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse any training source from :data:`FORBIDDEN` (validation-only data or the evaluation pair).

    Raises:
        AvsmError: naming the first forbidden file.
    """
    for p in paths:
        parts = [q.lower() for q in Path(p).parts]
        for bad in FORBIDDEN:
            if any(bad in q for q in parts):
                raise AvsmError(f"may not be used for training ({bad}: validation / evaluation data only)", p)
