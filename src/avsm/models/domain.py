"""Is an input like the network's training data?  An intensity signature and a reference.

A registration network only knows the kind of image it was trained on.  The bundled brain
model was trained on T1 MRI heads (whole head and skull-stripped) on a working grid at
``config.working_spacing`` with intensities normalised by :func:`avsm.api.to_working`
(0.1 / 99.9 percentiles → [0, 1]).  :func:`check_input` says, in words, why an input does
not look like that, so that :func:`avsm.api.register` can suggest ``--method opt``.

Three checks:

* **modality**: CT (Hounsfield units, :func:`avsm.api.detect_modality`) when the training
  data were MR;
* **field of view**: every axis of the image's physical box within the training range
  (:data:`HEAD_EXTENT_MM`, head-sized);
* **intensity signature** (only when the model carries a :class:`DomainReference`): the
  histogram of the working-grid foreground (:func:`intensity_signature`) compared with the
  training images' mean histogram by the Jensen–Shannon divergence (:func:`signature_distance`).

Choices (measured on real data with ``scripts/domain_reference.py``: a reference from 20
IXI training subjects, whole head + skull-stripped, 32 bins):

* Jensen–Shannon divergence in bits, in [0, 1]: bounded, symmetric and defined when a bin
  is empty in one histogram (unlike Kullback–Leibler); it weighs a missing or extra mode
  (CT's narrow soft-tissue peak, an inverted contrast) more than L1 does.
* one mean over *both* variants (whole head and skull-stripped): the mean is broad, so T1
  from other scanners sits near it (OASIS 0.2×, Colin27 1.3×, ICBM 2009c 1.5× the largest
  training distance), while a prototype per variant is so tight that other T1 scanners
  fall outside (OASIS 2–5×).
* threshold = :data:`DEFAULT_MARGIN` (2.0) × the **largest** training distance to the mean
  (a training set of a few dozen images has no stable 99th percentile; the largest
  distance is the 99th percentile's conservative stand-in).  Chest CT lies at 2.2–2.6×
  (windowed as CT) and 3.0–3.6× (normalised as if MR) the largest training distance.
* the foreground fraction of the box is *not* part of the signature: it depends on the
  field of view and cropping (0.13 for OASIS, 0.9 for the MNI152 head, 0.86 for chest CT)
  more than on the kind of image.

Limits: a histogram at ~4 mm does not tell T1 from T2, PD or FLAIR reliably (they pass at
0.9–1.5×), nor does it see anatomy; the check catches gross differences (CT, another body
part, a broken normalisation), not every image the network would handle badly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MARGIN",
    "FOREGROUND",
    "HEAD_EXTENT_MM",
    "DomainReference",
    "add_reference_to_weights",
    "check_input",
    "fit_reference",
    "intensity_signature",
    "signature_distance",
]

#: working-grid intensity (in [0, 1]) above which a voxel is foreground
FOREGROUND: float = 0.02
#: physical box of head-sized training volumes, mm per axis (inclusive range)
HEAD_EXTENT_MM: tuple[float, float] = (100.0, 300.0)
#: threshold = margin × the largest training distance to the mean signature
DEFAULT_MARGIN: float = 2.0
#: the distance :func:`signature_distance` computes (recorded in every reference)
DISTANCE = "jensen-shannon (bits)"


def intensity_signature(image: torch.Tensor | np.ndarray, bins: int = 32) -> np.ndarray:
    """Normalised histogram of the foreground of a working-grid image.

    Args:
        image: a working-grid image with intensities in [0, 1] (``(1, 1, D, H, W)`` tensor
            as :func:`avsm.api.prepare_pair` makes it, or any array of such voxels).
        bins: histogram bins, equal width over ``[FOREGROUND, 1]``.

    Returns:
        ``(bins,)`` float64, summing to 1 (all zeros when no voxel is foreground): the
        share of foreground voxels (``> FOREGROUND``) in each intensity bin.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    a = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    a = a.reshape(-1)
    fg = a[np.isfinite(a) & (a > FOREGROUND)]
    hist, _ = np.histogram(np.clip(fg, FOREGROUND, 1.0), bins=bins, range=(FOREGROUND, 1.0))
    total = hist.sum()
    return hist / total if total > 0 else np.zeros(bins, dtype=np.float64)


def signature_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence between two histograms, in bits: 0 (same) … 1 (disjoint).

    Both are renormalised to sum 1; an empty histogram (no foreground) is at distance 1
    from any other.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"signatures of different lengths: {p.shape} and {q.shape}")
    sp, sq = p.sum(), q.sum()
    if sp <= 0 or sq <= 0:
        return 0.0 if sp <= 0 and sq <= 0 else 1.0
    p, q = p / sp, q / sq
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        k = a > 0
        return float(np.sum(a[k] * np.log2(a[k] / m[k])))

    return float(min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0))


@dataclass
class DomainReference:
    """What the training images looked like (stored in a weights file's ``meta["domain"]``).

    Attributes:
        mean_signature: ``(bins,)`` mean :func:`intensity_signature` of the training images.
        threshold: largest :func:`signature_distance` to the mean still accepted.
        extent_mm: ``(lo, hi)`` accepted physical size of every axis of the image box, mm.
        modality: ``mr`` or ``ct``: what the training images were.
        distance: name of the distance (informative; :data:`DISTANCE`).
        margin: threshold / largest training distance.
        n_images: training images the reference was fitted on.
        training_max: largest training distance to the mean.
        description: free text (e.g. the data and working spacing).
    """

    mean_signature: np.ndarray
    threshold: float
    extent_mm: tuple[float, float] = HEAD_EXTENT_MM
    modality: str = "mr"
    distance: str = DISTANCE
    margin: float = DEFAULT_MARGIN
    n_images: int = 0
    training_max: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        self.mean_signature = np.asarray(self.mean_signature, dtype=np.float64).reshape(-1)
        if self.mean_signature.size < 2:
            raise ValueError("a domain reference needs a signature of at least 2 bins")
        self.extent_mm = (float(self.extent_mm[0]), float(self.extent_mm[1]))
        self.threshold = float(self.threshold)

    @property
    def bins(self) -> int:
        """Histogram bins of the signature."""
        return int(self.mean_signature.size)

    def distance_of(self, image: torch.Tensor | np.ndarray) -> float:
        """:func:`signature_distance` of a working-grid image to the mean training signature."""
        return signature_distance(intensity_signature(image, self.bins), self.mean_signature)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists and floats)."""
        return {"mean_signature": [float(v) for v in self.mean_signature], "threshold": self.threshold,
                "extent_mm": list(self.extent_mm), "modality": self.modality, "distance": self.distance,
                "margin": float(self.margin), "n_images": int(self.n_images),
                "training_max": float(self.training_max), "description": self.description}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainReference:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        if "extent_mm" in kw:
            kw["extent_mm"] = tuple(kw["extent_mm"])
        return cls(**kw)


def fit_reference(images: Sequence[torch.Tensor | np.ndarray], *, bins: int = 32, margin: float = DEFAULT_MARGIN,
                  extent_mm: tuple[float, float] = HEAD_EXTENT_MM, modality: str = "mr",
                  description: str = "") -> DomainReference:
    """The reference of a set of training images: mean signature and threshold.

    Args:
        images: working-grid images in [0, 1], normalised exactly as at inference
            (:func:`avsm.api.working_grid_for` + :func:`avsm.api.to_working`).
        bins: histogram bins of the signature.
        margin: threshold = ``margin`` × the largest training distance to the mean.
        extent_mm: accepted size of every axis of the image box, mm (not fitted: the
            training volumes may all share one field of view).
        modality: what the training images were.
        description: stored with the reference.

    Raises:
        ValueError: fewer than two images, or an image without foreground.
    """
    if len(images) < 2:
        raise ValueError(f"fit_reference needs at least 2 images, got {len(images)}")
    if margin < 1.0:
        raise ValueError(f"margin must be >= 1 (the training images themselves must pass), got {margin}")
    sigs = np.stack([intensity_signature(im, bins) for im in images])
    empty = np.flatnonzero(sigs.sum(1) == 0)
    if empty.size:
        raise ValueError(f"training image(s) {empty.tolist()} have no foreground (> {FOREGROUND})")
    mean = sigs.mean(0)
    dists = np.array([signature_distance(s, mean) for s in sigs])
    dmax = float(dists.max())
    log.info("domain reference: %d images, distance to mean median %.4f max %.4f, threshold %.4f",
             len(images), float(np.median(dists)), dmax, margin * dmax)
    return DomainReference(mean, margin * dmax, extent_mm, modality, DISTANCE, float(margin), len(images), dmax,
                           description)


def _fmt_extent(extent_mm: Sequence[float]) -> str:
    return "×".join(f"{e:.0f}" for e in extent_mm)


def check_input(volume_working: torch.Tensor | np.ndarray | None, extent_mm: Sequence[float], modality: str,
                reference: DomainReference | None) -> list[str]:
    """Why an input looks unlike the network's training data (empty list: it looks fine).

    Args:
        volume_working: the input on its working grid, intensities in [0, 1] (as the
            network sees it); ``None`` skips the signature check.
        extent_mm: physical size of the image's own box per axis, mm (``grid.extent_mm``).
        modality: the input's modality (``mr`` / ``ct``).
        reference: the model's reference; ``None`` (older weights): only the CT and
            field-of-view checks, against MR and :data:`HEAD_EXTENT_MM`.

    Returns:
        One short sentence per problem.
    """
    reasons: list[str] = []
    trained = reference.modality if reference is not None else "mr"
    if modality != trained:
        what = "CT Hounsfield units" if modality == "ct" else modality.upper()
        reasons.append(f"its intensities look like {what} and the network was trained on {trained.upper()} only")
    lo, hi = reference.extent_mm if reference is not None else HEAD_EXTENT_MM
    ext = [float(e) for e in extent_mm]
    if not all(lo <= e <= hi for e in ext):
        reasons.append(f"field of view {_fmt_extent(ext)} mm is outside the training range "
                       f"{lo:.0f}–{hi:.0f} mm per axis (head-sized)")
    if reference is not None and volume_working is not None:
        d = reference.distance_of(volume_working)
        if d > reference.threshold:
            reasons.append(f"its intensity histogram differs from the training images' "
                           f"(distance {d:.3f} > threshold {reference.threshold:.3f})")
    return reasons


def add_reference_to_weights(weights: str | os.PathLike[str], reference: DomainReference) -> Path:
    """Store ``reference`` in an exported weights file's ``meta["domain"]`` (and its sibling ``.json``).

    The ``.pt`` is rewritten atomically (temporary file + rename); the model's weights are
    unchanged.  The sibling ``<name>.json`` (written by ``avsm.train.trainer.export_weights``)
    gets the same ``meta["domain"]``; it is created when missing.

    Returns:
        The weights path.

    Raises:
        ValueError: not an exported weights file (no ``config`` / ``state_dict``).
    """
    p = Path(weights)
    state = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise ValueError(f"{p}: not an exported avsm weights file (no config/state_dict)")
    meta = dict(state.get("meta") or {})
    meta["domain"] = reference.to_dict()
    state["meta"] = meta
    tmp = p.with_name(p.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)
    side = p.with_suffix(".json")
    doc: dict[str, Any] = json.loads(side.read_text()) if side.is_file() else {
        "config": state["config"], "versions": state.get("versions", {})}
    doc["meta"] = {**(doc.get("meta") or {}), "domain": reference.to_dict()}
    side.write_text(json.dumps(doc, indent=2))
    log.info("domain reference written to %s and %s", p, side)
    return p
