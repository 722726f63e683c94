"""Quality-control figures (matplotlib, headless Agg backend).

* :func:`pair_figure`: like the paper's Fig. 4: source, target, warped, warped
  with the deformation grid, affine-only warped, and source / target / warped
  labels, on three orthogonal slices (axial, coronal, sagittal through the
  centre of the fixed image).
* :func:`jacobian_figure`: det J on the three slices (log colour scale) with
  folded voxels (det J < 0) marked.
* :func:`dice_boxplot`: Dice per method over the pairs of a ``results.csv``
  (Fig. 5).
* :func:`steps_curve` / :func:`plot_steps_curve`: Dice and folds against the
  network's test-time vSVF and affine steps (Fig. 8).

Images are shown in the canonical orientation (:meth:`avsm.io.image.Volume.canonical`:
tensor axes ≈ S-I, A-P, L-R), each slice with its physical aspect ratio.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm  # noqa: E402

from avsm.io.geometry import Grid  # noqa: E402
from avsm.io.image import Volume  # noqa: E402

__all__ = ["pair_figure", "jacobian_figure", "dice_boxplot", "steps_curve", "plot_steps_curve"]

log = logging.getLogger(__name__)

VIEWS = ("axial", "coronal", "sagittal")


def _canonical_view(grid: Grid) -> tuple[Grid, tuple[int, int, int], tuple[bool, bool, bool]]:
    perm, flips = grid.canonical_axes()
    return grid.canonical(), perm, flips


def _to_canonical(arr: np.ndarray, grid: Grid) -> np.ndarray:
    perm, flips = grid.canonical_axes()
    a = np.transpose(arr, perm)
    axes = [t for t in range(3) if flips[t]]
    return np.flip(a, axis=axes) if axes else a


def _slices(arr: np.ndarray, centre: Sequence[int] | None = None) -> list[np.ndarray]:
    """Three orthogonal slices of a canonical array (axial, coronal, sagittal), shown top = superior."""
    c = [s // 2 for s in arr.shape] if centre is None else list(centre)
    ax = arr[c[0]]            # (A-P, L-R)
    co = arr[:, c[1], :]      # (S-I, L-R)
    sa = arr[:, :, c[2]]      # (S-I, A-P)
    # canonical tensor axis 0 runs towards superior: flip so superior is up
    return [ax, co[::-1], sa[::-1]]


def _aspects(grid: Grid) -> list[float]:
    sx, sy, sz = grid.canonical().spacing  # ITK order x (L-R), y (A-P), z (S-I)
    return [sy / sx, sz / sx, sz / sy]


def _label_cmap(n: int = 256) -> ListedColormap:
    rng = np.random.default_rng(7)
    cols = rng.uniform(0.15, 1.0, size=(n, 4))
    cols[:, 3] = 1.0
    cols[0] = (0, 0, 0, 1)
    return ListedColormap(cols)


def _label_show(arr: np.ndarray) -> np.ndarray:
    """Labels folded into 1..255 for a stable random colour map (0 stays black)."""
    a = np.asarray(arr).astype(np.int64)
    return np.where(a > 0, (a - 1) % 255 + 1, 0)


def _robust(arr: np.ndarray) -> tuple[float, float]:
    v = arr[np.isfinite(arr)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def pair_figure(
    fixed: Volume,
    moving: Volume,
    result: Any,
    out_png: str,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    *,
    title: str | None = None,
    grid_step: int = 6,
    dpi: int = 100,
) -> str:
    """The per-pair QC figure (paper Fig. 4) on three orthogonal slices.

    Args:
        fixed, moving: the intensity images (target and source).
        result: a registration result (``warp``, ``unit_map`` or ``world_map``).
        out_png: output PNG path (folder created if missing).
        fixed_labels, moving_labels: optional label maps (adds three columns).
        title: figure title (default: the method name).
        grid_step: spacing, in moving-image voxels, of the drawn deformation grid lines.
        dpi: resolution.

    Returns:
        ``out_png``.
    """
    fg = fixed.grid
    warped = result.warp(moving)
    cols: list[tuple[str, np.ndarray, Grid, str]] = [
        ("source", moving.array, moving.grid, "img"),
        ("target", fixed.array, fg, "img"),
        ("warped", warped.array, fg, "img"),
        ("warped + grid", warped.array, fg, "grid"),
    ]
    try:
        aff = result.warp(moving, affine_only=True)
        cols.append(("affine only", aff.array, fg, "img"))
    except (NotImplementedError, TypeError):
        log.info("no affine-only transform for %s", getattr(result, "method", "?"))
    if fixed_labels is not None and moving_labels is not None:
        wl = result.warp(moving_labels, onto=fixed_labels.grid)
        cols += [("source labels", moving_labels.array, moving_labels.grid, "lab"),
                 ("target labels", fixed_labels.array, fixed_labels.grid, "lab"),
                 ("warped labels", wl.array, fixed_labels.grid, "lab")]
    # deformation: moving voxel coordinates at each fixed voxel (canonical moving axes)
    cm_grid = moving.grid.canonical()
    wm = result.world_map(fg).double()[0].numpy()  # (3, D, H, W) world mm
    w2i = np.linalg.inv(cm_grid.index_to_world())
    idx = np.einsum("ij,jdhw->idhw", w2i[:3, :3], wm) + w2i[:3, 3].reshape(3, 1, 1, 1)  # ITK (x, y, z)
    defo = [_to_canonical(idx[k], fg) for k in range(3)]  # canonical x (L-R), y (A-P), z (S-I)
    fig, axes = plt.subplots(3, len(cols), figsize=(2.2 * len(cols), 6.9), squeeze=False)
    lcm = _label_cmap()
    for j, (name, arr, g, kind) in enumerate(cols):
        can = _to_canonical(arr, g)
        sl = _slices(can)
        asp = _aspects(g)
        lo, hi = _robust(can) if kind != "lab" else (0, 255)
        for i in range(3):
            ax = axes[i, j]
            if kind == "lab":
                ax.imshow(_label_show(sl[i]), cmap=lcm, vmin=0, vmax=255, interpolation="nearest", aspect=asp[i])
            else:
                ax.imshow(sl[i], cmap="gray", vmin=lo, vmax=hi, aspect=asp[i])
            if kind == "grid":
                # in-plane components: axial (y, x), coronal (z, x), sagittal (z, y)
                comp = [(1, 0), (2, 0), (2, 1)][i]
                for k in comp:
                    field = _slices(defo[k])[i]
                    fmin, fmax = np.nanmin(field), np.nanmax(field)
                    levels = np.arange(np.ceil(fmin / grid_step) * grid_step, fmax, grid_step)
                    if levels.size:
                        ax.contour(field, levels=levels, colors="yellow", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(VIEWS[i], fontsize=8)
    fig.suptitle(title or str(getattr(result, "method", "")), fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png, dpi)


def _save(fig: Any, out_png: str, dpi: int) -> str:
    d = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(d, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def jacobian_figure(result: Any, out_png: str, *, grid: Grid | None = None, background: Volume | None = None,
                    dpi: int = 100) -> str:
    """det J of the forward transform on three slices, log colour scale, folds in red.

    Args:
        result: a registration result (``jacobian_determinant(grid)``).
        out_png: output PNG path.
        grid: where det J is evaluated (default: the fixed image's grid).
        background: unused placeholder for an anatomical underlay (kept for API stability).
        dpi: resolution.

    Returns:
        ``out_png``.
    """
    grid = grid or result.fixed_original
    det = result.jacobian_determinant(grid)
    can = _to_canonical(det, grid)
    folds = can < 0
    asp = _aspects(grid)
    pos = np.where(can > 0, can, np.nan)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    norm = LogNorm(vmin=0.25, vmax=4.0)
    im = None
    n_f = int(folds.sum())
    for i, (ax, s, fs) in enumerate(zip(axes, _slices(pos), _slices(folds.astype(float)))):
        im = ax.imshow(np.clip(s, 0.25, 4.0), cmap="RdBu_r", norm=norm, aspect=asp[i])
        yy, xx = np.nonzero(fs > 0.5)
        if yy.size:
            ax.scatter(xx, yy, s=4, c="red", marker="x", linewidths=0.6)
        ax.set_title(f"{VIEWS[i]}: {int((fs > 0.5).sum())} folds in slice", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="det J (log scale)")
    fig.suptitle(f"{getattr(result, 'method', '')}: det J, {n_f} folded voxels "
                 f"({100.0 * n_f / det.size:.4f} %), range [{np.nanmin(det):.3g}, {np.nanmax(det):.3g}]",
                 fontsize=9)
    return _save(fig, out_png, dpi)


def dice_boxplot(results_csv: str, out_png: str, *, methods: Sequence[str] | None = None,
                 per_label: bool = False, dpi: int = 100) -> str:
    """Box plots of Dice per method from an ``avsm evaluate`` ``results.csv`` (paper Fig. 5).

    Args:
        results_csv: the harness' results file.
        out_png: output PNG path.
        methods: order / subset of methods (default: order of appearance).
        per_label: one value per pair and label (default: the per-pair mean Dice).
        dpi: resolution.

    Returns:
        ``out_png``.
    """
    with open(results_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("status") == "ok"]
    order = list(methods) if methods else list(dict.fromkeys(r["method"] for r in rows))
    data = []
    for m in order:
        vals: list[float] = []
        for r in rows:
            if r["method"] != m:
                continue
            if per_label and r.get("dice_per_label"):
                vals += [float(v) for v in json.loads(r["dice_per_label"]).values() if v == v]
            elif r.get("dice_mean"):
                vals.append(float(r["dice_mean"]))
        data.append(vals)
    fig, ax = plt.subplots(figsize=(1.2 * max(len(order), 3) + 1, 4))
    ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(order) + 1), order, rotation=30, ha="right")
    for k, d in enumerate(data, start=1):
        ax.scatter(np.full(len(d), k) + np.random.default_rng(k).uniform(-0.08, 0.08, len(d)), d, s=8, alpha=0.6)
    ax.set_ylabel("Dice (per label)" if per_label else "mean Dice per pair")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png, dpi)


def plot_steps_curve(records: Sequence[Mapping[str, Any]], out_png: str, *, dpi: int = 100) -> str:
    """Dice and folds against test-time steps (paper Fig. 8).

    Args:
        records: dicts with ``kind`` (``"vsvf"`` or ``"affine"``), ``steps`` (int),
            ``dice`` (mean Dice) and ``folds`` (count).
        out_png: output PNG path.
        dpi: resolution.

    Returns:
        ``out_png``.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    styles = {"vsvf": ("tab:blue", "o"), "affine": ("tab:green", "s")}
    for kind in ("vsvf", "affine"):
        rs = sorted((r for r in records if r["kind"] == kind), key=lambda r: r["steps"])
        if not rs:
            continue
        col, mk = styles[kind]
        st = [r["steps"] for r in rs]
        ax.plot(st, [r["dice"] for r in rs], marker=mk, color=col, label=f"Dice, {kind} steps")
        ax2.plot(st, [r["folds"] for r in rs], marker=mk, color=col, ls="--", alpha=0.6, label=f"folds, {kind} steps")
    ax.set_xlabel("test-time steps")
    ax.set_ylabel("mean Dice")
    ax2.set_ylabel("folds (det J < 0 voxels)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png, dpi)


def steps_curve(
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume,
    moving_labels: Volume,
    out_png: str,
    *,
    mapping: Mapping[int, int] | None = None,
    vsvf_steps: Sequence[int] = (1, 2, 3, 4, 5),
    affine_steps: Sequence[int] = (1, 2, 3, 4, 5, 6, 7),
    model: Any = None,
) -> list[dict[str, Any]]:
    """Run the network with varying test-time steps and plot Dice / folds (Fig. 8).

    Needs the pretrained network (:func:`avsm.models.pretrained.load_pretrained`);
    raises whatever loading it raises when it is absent.

    Returns:
        The records plotted (see :func:`plot_steps_curve`).
    """
    from avsm.api import register
    from avsm.metrics.deformation import fold_stats
    from avsm.metrics.overlap import dice_per_label, mean_dice

    labels = sorted(mapping) if mapping else None
    records: list[dict[str, Any]] = []
    for kind, values in (("vsvf", vsvf_steps), ("affine", affine_steps)):
        for k in values:
            kw = {"vsvf_steps": k} if kind == "vsvf" else {"affine_steps": k}
            res = register(fixed=fixed, moving=moving, method="net", model=model, progress=False, **kw)
            wl = res.warp(moving_labels, onto=fixed_labels.grid)
            d = mean_dice(dice_per_label(wl.array, fixed_labels.array, labels=labels, mapping=mapping))
            records.append({"kind": kind, "steps": int(k), "dice": d,
                            "folds": fold_stats(res.jacobian_determinant()).count})
    plot_steps_curve(records, out_png)
    return records
