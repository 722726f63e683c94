"""Label overlap: Dice per label (with an optional label correspondence between protocols),
and the labels two maps have in common."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
    pairs = [(int(t), mapping.get(int(t), int(t)) if mapping else int(t)) for t in labels]
    counts = _joint_counts(pred, truth) if pairs else None
    out: dict[int, float] = {}
    for t, p in pairs:
        if counts is not None:
            n_p, n_t, both = counts(p, t)
        else:
            a = pred == p
            b = truth == t
            n_p, n_t, both = int(a.sum()), int(b.sum()), int(np.logical_and(a, b).sum())
        denom = n_p + n_t
        out[t] = float(2.0 * both / denom) if denom else float("nan")
    return out


def _joint_counts(pred: np.ndarray, truth: np.ndarray) -> Callable[[int, int], tuple[int, int, int]] | None:
    """``(p, t) -> (|pred == p|, |truth == t|, |pred == p and truth == t|)`` from one joint histogram.

    One pass over the voxels for all labels (instead of three per label); ``None`` when the
    arrays are not integer or their value ranges are too wide for a dense histogram.
    """
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(truth.dtype, np.integer)) or pred.size == 0:
        return None
    lo_p, hi_p, lo_t, hi_t = int(pred.min()), int(pred.max()), int(truth.min()), int(truth.max())
    n_p, n_t = hi_p - lo_p + 1, hi_t - lo_t + 1
    if n_p * n_t > 1 << 25:
        return None
    code = pred.reshape(-1).astype(np.int64)
    code -= lo_p
    code *= n_t
    code += truth.reshape(-1)
    code -= lo_t
    joint = np.bincount(code, minlength=n_p * n_t).reshape(n_p, n_t)
    rows, cols = joint.sum(1), joint.sum(0)

    def counts(p: int, t: int) -> tuple[int, int, int]:
        ip, it = p - lo_p, t - lo_t
        a = int(rows[ip]) if 0 <= ip < n_p else 0
        b = int(cols[it]) if 0 <= it < n_t else 0
        return a, b, (int(joint[ip, it]) if a and b else 0)

    return counts


def shared_labels(
    fixed_labels: np.ndarray,
    moving_labels: np.ndarray,
    mapping: Mapping[int, int] | None = None,
) -> list[int]:
    """Non-zero fixed labels that also occur in the moving label map (through ``mapping``).

    Use it before scoring to warn that Dice will be meaningless, e.g.
    ``if not shared_labels(f, m, mapping): logger.warning("no label in common ...")``.
    The two maps need not be on the same grid (only the label values are compared).

    Args:
        fixed_labels: integer label array of the fixed image, any shape.
        moving_labels: integer label array of the moving image, any shape.
        mapping: ``fixed label -> moving label`` as in :func:`dice_per_label`
            (a fixed label missing from it maps to itself); ``None`` or empty
            means identity.  A fixed label mapped to 0 (background) never counts.

    Returns:
        The sorted fixed labels ``t != 0`` whose counterpart ``mapping.get(t, t)``
        is a non-zero value present in ``moving_labels``; empty when they share none.
    """
    fixed = sorted({int(v) for v in np.unique(fixed_labels)} - {0})
    moving = {int(v) for v in np.unique(moving_labels)} - {0}
    return [t for t in fixed if (mapping.get(t, t) if mapping else t) in moving]


def mean_dice(scores: Mapping[int, float]) -> float:
    """Mean of the per-label Dice scores, ignoring labels absent from both images."""
    vals = [v for v in scores.values() if v == v]
    return float(np.mean(vals)) if vals else float("nan")
