"""One registration from files to files: what ``avsm register`` and the batch runner do.

All inputs are read and validated before anything is computed or written;
every output is written through an :class:`~avsm.io.outputs.OutputTransaction`
so a failure leaves no partial files, and an output can never overwrite an
input.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avsm import __version__
from avsm.api import register
from avsm.errors import AvsmError
from avsm.export.itk import field_slab, world_affine, write_transforms
from avsm.io.image import Volume, check_same_geometry, load_image
from avsm.io.masks import load_mask
from avsm.io.nifti import write_nifti
from avsm.io.outputs import OutputTransaction
from avsm.labels import read_label_mapping, scored_labels  # noqa: F401 - read_label_mapping re-exported
from avsm.metrics.overlap import dice_per_label, mean_dice, shared_labels
from avsm.settings import DEFAULT_PRESET, RegistrationSettings, preset
from avsm.transform import (
    RegistrationResult,
    VolumeSampler,
    grid_affine_map,
    slab_ranges,
    world_jacobian_determinant,
)

log = logging.getLogger(__name__)

OUTPUT_NAMES = {
    "warped": "warped.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "summary": "summary.json",
    "qc": "qc.png",
    "transform_prefix": "transform_",
}


@dataclass
class OutputSettings:
    """What :func:`register_pair` writes besides the warped image and summary.

    Attributes:
        formats: transform formats (:data:`avsm.export.itk.FORMATS`): ``ants``
            (``0GenericAffine.mat``, ``1Warp``, ``1InverseWarp``, as antsRegistration writes),
            ``avsm`` (the compact ``avsm.npz``), ``composite`` (``Composite``,
            ``InverseComposite``), ``tfm`` (the affine as ITK text), ``h5`` (ITK HDF5
            ``Composite.h5``, ``InverseComposite.h5``, as antsRegistration writes), ``l2r`` (Learn2Reg
            displacement).  Default ``ants`` and ``avsm``.
        qc: also write ``qc.png``.
    """

    formats: tuple[str, ...] = ("ants", "avsm")
    qc: bool = False

    def __post_init__(self) -> None:
        from avsm.export.itk import FORMATS

        self.formats = tuple(dict.fromkeys(self.formats))
        bad = set(self.formats) - set(FORMATS)
        if bad or not self.formats:
            raise AvsmError(f"unknown transform format(s) {sorted(bad)}; choose from {', '.join(FORMATS)}")


def _load_pair(fixed: str, moving: str, fixed_labels: str | None, moving_labels: str | None,
               fixed_series: str | None = None, moving_series: str | None = None,
               ) -> tuple[Volume, Volume, Volume | None, Volume | None]:
    fv = load_image(fixed, series=fixed_series)
    mv = load_image(moving, series=moving_series)
    fl = ml = None
    if fixed_labels:
        fl = load_image(fixed_labels, label=True, require_labels=True)
        check_same_geometry(fv, fl)
    if moving_labels:
        ml = load_image(moving_labels, label=True, require_labels=True)
        check_same_geometry(mv, ml)
    return fv, mv, fl, ml


def _json_ready(obj: Any) -> Any:
    """Tuples → lists (``summary.json`` is plain JSON)."""
    return json.loads(json.dumps(obj))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class ForwardOutputs:
    """Everything computed from the forward map on the fixed image's own grid, in one pass.

    Attributes:
        warped: ``fixed.shape`` float32 warped moving image.
        labels, labels_affine: warped moving labels (full transform / affine alone), or ``None``.
        warp_field: ``(3, *fixed.shape)`` float32 ANTs ``1Warp`` displacement (mm), or ``None``.
        folds, det_min, det_max: voxels with ``det J < 0`` and the range of ``det J``.
    """

    warped: np.ndarray
    labels: np.ndarray | None
    labels_affine: np.ndarray | None
    warp_field: np.ndarray | None
    folds: int
    det_min: float
    det_max: float


def forward_outputs(result: RegistrationResult, moving: Volume, moving_labels: Volume | None = None, *,
                    labels_affine: bool = False, warp_field: bool = False) -> ForwardOutputs:
    """Warped image, labels, det J statistics and the ANTs warp field from one slab-wise pass.

    The forward world map is evaluated once per slab (with a one-slice halo for the
    central differences of det J) and everything is derived from it, so a large
    fixed grid costs one map evaluation and the memory of the outputs themselves.
    """
    grid = result.fixed_original
    D = grid.shape[0]
    img = VolumeSampler(moving)
    lab = VolumeSampler(moving_labels) if moving_labels is not None else None
    M = world_affine(result)
    warped = img.empty(grid.shape)
    labels = lab.empty(grid.shape) if lab is not None else None
    labels_aff = lab.empty(grid.shape) if lab is not None and labels_affine else None
    field = np.empty((3, *grid.shape), dtype=np.float32) if warp_field else None
    folds, det_min, det_max = 0, math.inf, -math.inf
    for z0, z1 in slab_ranges(grid):
        a, b = max(z0 - 1, 0), min(z1 + 1, D)
        halo = grid.slab(a, b)
        wm = result.world_map(halo, dtype=torch.float32)
        det = world_jacobian_determinant(wm, halo)[z0 - a:z1 - a]
        folds += int((det < 0).sum())
        det_min, det_max = min(det_min, float(det.min())), max(det_max, float(det.max()))
        core = wm[:, :, z0 - a:z1 - a]
        warped[z0:z1] = img(core)
        if lab is not None and labels is not None:
            labels[z0:z1] = lab(core)
            if labels_aff is not None:  # the affine alone: world points M(x), one float32 affine map
                sl = grid.slab(z0, z1)
                labels_aff[z0:z1] = lab(grid_affine_map(M @ sl.unit_to_world(), sl.shape, dtype=torch.float32))
        if field is not None:
            field[:, z0:z1] = field_slab(result, "warp", grid.slab(z0, z1), M, world=core, dtype=torch.float32)
    return ForwardOutputs(warped, labels, labels_aff, field, folds, det_min, det_max)


def register_pair(
    fixed: str,
    moving: str,
    out_dir: str,
    *,
    settings: RegistrationSettings | None = None,
    outputs: OutputSettings | None = None,
    moving_labels: str | None = None,
    fixed_labels: str | None = None,
    label_mapping: str | Mapping[int, int] | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    fixed_series: str | None = None,
    moving_series: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write every output into ``out_dir``.

    Args:
        fixed, moving: image files (NIfTI, NRRD, MHA) or DICOM series folders.
        out_dir: output folder.
        settings: how to register (:class:`avsm.settings.RegistrationSettings`;
            default: the ``native`` preset, ``method='auto'``).
        outputs: which transform formats and figures to write.
        moving_labels, fixed_labels: label maps on the images' grids (warped / scored).
        label_mapping: ``fixed_label,moving_label`` CSV (or mapping) when protocols differ.
        fixed_mask, moving_mask: 0/1 masks on the images' grids (the similarity ignores
            voxels outside them).
        fixed_series, moving_series: SeriesInstanceUID when an input is a DICOM folder
            holding several series.
        progress: tqdm bars.

    Outputs (all on the fixed image's own grid unless stated): ``warped.nii.gz``,
    ``warped_labels.nii.gz`` (with ``moving_labels``), ANTs-style transforms
    ``transform_0GenericAffine.mat``, ``transform_1Warp.nii.gz`` and
    ``transform_1InverseWarp.nii.gz`` (both on the fixed grid, as ANTs writes
    them), the compact ``transform_avsm.npz`` (affine + low-resolution velocities),
    on request ``transform_Composite.nii.gz`` (fixed grid),
    ``transform_InverseComposite.nii.gz`` (moving grid) and the others of
    :class:`OutputSettings`, ``summary.json`` (method, settings, timings, folds, Dice when both label maps are
    given), and ``qc.png`` with ``outputs.qc``.

    Returns:
        The summary dictionary (also written to ``summary.json``).

    Raises:
        AvsmError: unreadable or invalid input, an output path equal to an input,
            or an unwritable output directory.  Nothing is written then.
    """
    s = settings or preset(DEFAULT_PRESET)
    out_cfg = outputs or OutputSettings()
    method, device = s.method, s.device
    formats, qc = out_cfg.formats, out_cfg.qc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AvsmError("CUDA was requested but no CUDA device is available", device)
    fv, mv, fl, ml = _load_pair(fixed, moving, fixed_labels, moving_labels, fixed_series, moving_series)
    fm = load_mask(fixed_mask, fv) if fixed_mask else None
    mm = load_mask(moving_mask, mv) if moving_mask else None
    mapping: Mapping[int, int] | None
    mapping = read_label_mapping(label_mapping) if isinstance(label_mapping, (str, os.PathLike)) else label_mapping
    if fl is not None and ml is not None and not shared_labels(fl.array, ml.array, mapping):
        log.warning("%s and %s share no label value%s: Dice is not defined and is not reported",
                    fixed_labels, moving_labels, "" if mapping else " (give --label-mapping)")
    inputs = [p for p in (fixed, moving, fixed_labels, moving_labels, fixed_mask, moving_mask) if p]
    with OutputTransaction(inputs=inputs) as tx:
        out = Path(out_dir)
        paths = {k: str(out / v) for k, v in OUTPUT_NAMES.items()}
        # reserve the outputs first: refuses output == input before any work
        tx_paths = {"warped": tx.path(paths["warped"]), "summary": tx.path(paths["summary"])}
        if ml is not None:
            tx_paths["warped_labels"] = tx.path(paths["warped_labels"])
        if qc:
            tx_paths["qc"] = tx.path(paths["qc"])
        t0 = time.perf_counter()
        result = register(fixed=fv, moving=mv, settings=s, fixed_mask=fm, moving_mask=mm, progress=progress)
        t_reg = time.perf_counter() - t0
        rss_reg = _peak_rss_mb()
        t_out = time.perf_counter()
        fwd = forward_outputs(result, mv, ml, labels_affine=fl is not None and ml is not None,
                              warp_field="ants" in formats or "h5" in formats)
        write_nifti(fwd.warped, fv.grid, tx_paths["warped"], final=paths["warped"])
        fwd.warped = None  # type: ignore[assignment]  # release each output once written
        folds, det_min, det_max = fwd.folds, fwd.det_min, fwd.det_max
        summary: dict[str, Any] = {
            "avsm_version": __version__,
            "method": result.method,
            "method_requested": method,
            "preset": s.preset,
            "init": result.info.get("init"),
            "fixed": os.path.abspath(fixed),
            "moving": os.path.abspath(moving),
            "device": device,
            "working_grid_fixed": list(result.fixed_grid.shape),
            "working_grid_moving": list(result.moving_grid.shape),
            "time_registration_s": round(t_reg, 3),
            "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
            "folds": folds,
            "fold_fraction": folds / result.fixed_original.num_voxels,
            "folds_working_grid": result.folds(),
            "jacobian_min": det_min,
            "jacobian_max": det_max,
            "peak_rss_mb_registration": round(rss_reg, 1),
            "host": platform.node(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "settings": _json_ready(s.to_dict()),
        }
        if any(result.info.get("domain_warnings", {}).values()):
            summary["domain_warnings"] = result.info["domain_warnings"]  # the input is unlike the network's data
        if ml is not None:
            assert fwd.labels is not None
            write_nifti(fwd.labels, fv.grid, tx_paths["warped_labels"], final=paths["warped_labels"])
            if fl is not None and fwd.labels_affine is not None and shared_labels(fl.array, ml.array, mapping):
                scored = scored_labels(fl.array, ml.array, mapping)  # the one Dice rule (avsm.labels)
                d = dice_per_label(fwd.labels, fl.array, mapping=mapping, labels=scored)
                da = dice_per_label(fwd.labels_affine, fl.array, mapping=mapping, labels=scored)
                summary["dice"] = {str(k): (round(v, 4) if not math.isnan(v) else None) for k, v in d.items()}
                summary["mean_dice"] = round(mean_dice(d), 4)
                summary["mean_dice_affine_only"] = round(mean_dice(da), 4)
        fields = {"warp": fwd.warp_field} if fwd.warp_field is not None else {}
        fwd = None  # type: ignore[assignment]  # write_transforms consumes the field
        transforms = write_transforms(result, paths["transform_prefix"], tx, formats=formats, fields=fields)
        summary["outputs"] = {"warped": paths["warped"], **({"warped_labels": paths["warped_labels"]}
                                                             if ml is not None else {}), **transforms}
        if qc:
            from avsm.viz.qc import pair_figure

            pair_figure(fv, mv, result, tx_paths["qc"], fixed_labels=fl, moving_labels=ml)
            summary["outputs"]["qc"] = paths["qc"]
        summary["time_outputs_s"] = round(time.perf_counter() - t_out, 3)
        summary["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        with open(tx_paths["summary"], "w") as fh:
            json.dump(summary, fh, indent=2)
    log.info("registered %s -> %s with %s in %.1f s", moving, fixed, result.method, t_reg)
    return summary

