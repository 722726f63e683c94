"""Surface distances between binary masks: the 95th-percentile Hausdorff distance (HD95).

Spacing arguments are **per array axis** (numpy/tensor order ``(D, H, W)``), in
millimetres.  A :class:`avsm.io.geometry.Grid` keeps its spacing in ITK order
``(x, y, z)``; use :func:`array_spacing` to convert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["array_spacing", "surface", "surface_distances", "hd95", "hd95_per_label"]


def array_spacing(grid: object) -> tuple[float, float, float]:
    """Spacing of a :class:`~avsm.io.geometry.Grid` in array-axis order ``(D, H, W)`` (mm)."""
    sx, sy, sz = grid.spacing  # type: ignore[attr-defined]
    return (float(sz), float(sy), float(sx))


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask: voxels of ``mask`` with a 6-neighbour outside it.

    Voxels on the array border count as boundary (the outside is background).

    Args:
        mask: boolean array of any dimension.

    Returns:
        boolean array, same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one mask to the other mask's surface.

    Args:
        pred_mask, truth_mask: boolean arrays of the same shape, both non-empty.
        spacing: voxel size per array axis in mm (default 1).

    Returns:
        ``(d_pred_to_truth, d_truth_to_pred)``: 1-D float64 arrays, one value per
        surface voxel of ``pred_mask`` and of ``truth_mask`` respectively.
    """
    p = np.asarray(pred_mask, dtype=bool)
    t = np.asarray(truth_mask, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {t.shape}")
    if not p.any() or not t.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    sp, st = surface(p), surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=sampling)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return dt_t[sp].astype(np.float64), dt_p[st].astype(np.float64)


def hd95(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm.

    The 95th percentile of the pooled surface-to-surface distances in both
    directions (MedPy's ``hd95`` definition).

    Args:
        pred_mask, truth_mask: boolean arrays of the same shape.
        spacing: voxel size per array axis ``(D, H, W)`` in mm (default 1 mm).

    Returns:
        HD95 in mm; ``0`` when both masks are empty, ``nan`` when exactly one is.
    """
    p = np.asarray(pred_mask, dtype=bool)
    t = np.asarray(truth_mask, dtype=bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    a, b = surface_distances(p, t, spacing)
    return float(np.percentile(np.concatenate([a, b]), 95))


def hd95_per_label(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    labels: Sequence[int] | None = None,
    mapping: Mapping[int, int] | None = None,
) -> dict[int, float]:
    """HD95 (mm) for each label, with the same label conventions as :func:`avsm.metrics.overlap.dice_per_label`.

    Args:
        pred: integer label array (e.g. warped moving labels), shape ``(D, H, W)``.
        truth: integer label array on the same grid.
        spacing: voxel size per array axis in mm.
        labels: labels of ``truth`` to score (default: its non-zero labels).
        mapping: ``truth label -> pred label`` for different protocols.

    Returns:
        ``{truth_label: hd95_mm}`` (``nan`` where only one of the two masks is empty).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"label arrays differ in shape: {pred.shape} vs {truth.shape}")
    if labels is None:
        labels = sorted(int(v) for v in np.unique(truth) if v != 0)
    out: dict[int, float] = {}
    for t in labels:
        p = mapping.get(int(t), int(t)) if mapping else int(t)
        sl = _bbox_union(pred == p, truth == t)
        if sl is None:
            out[int(t)] = 0.0
            continue
        out[int(t)] = hd95(pred[sl] == p, truth[sl] == t, spacing)
    return out


def _bbox_union(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box (padded by one voxel) of ``a | b``, or ``None`` if both are empty."""
    m = a | b
    if not m.any():
        return None
    out = []
    for ax in range(m.ndim):
        other = tuple(i for i in range(m.ndim) if i != ax)
        idx = np.flatnonzero(m.any(axis=other))
        out.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, m.shape[ax])))
    return tuple(out)
