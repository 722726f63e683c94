"""Label overlap: Dice per label (with an optional label correspondence between protocols)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def dice_per_label(
    pred: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[int] | None = None,
    mapping: Mapping[int, int] | None = None,
) -> dict[int, float]:
    """Dice ``2|P∩T| / (|P|+|T|)`` for each label.

    Args:
        pred: integer label array (e.g. warped moving labels), on the same grid as ``truth``.
        truth: integer label array (e.g. fixed labels).
        labels: labels of ``truth`` to score; default all non-zero labels present in either.
        mapping: ``truth label -> pred label`` when the two use different protocols
            (e.g. aseg → AAL); default identity.

    Returns:
        ``{truth_label: dice}``; a label absent from both scores ``nan``.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"label arrays differ in shape: {pred.shape} vs {truth.shape}")
    if labels is None:
        present = set(np.unique(truth).tolist())
        if mapping is None:
            present |= set(np.unique(pred).tolist())
        labels = sorted(v for v in present if v != 0)
    out: dict[int, float] = {}
    for t in labels:
        p = mapping.get(int(t), int(t)) if mapping else int(t)
        a = pred == p
        b = truth == t
        denom = int(a.sum()) + int(b.sum())
        out[int(t)] = float(2.0 * np.logical_and(a, b).sum() / denom) if denom else float("nan")
    return out


def mean_dice(scores: Mapping[int, float]) -> float:
    """Mean of the per-label Dice scores, ignoring labels absent from both images."""
    vals = [v for v in scores.values() if v == v]
    return float(np.mean(vals)) if vals else float("nan")
