"""Where the time of ``avsm register``'s output stage goes, on one 1 mm OASIS-TRT-20 pair.

The pair (default ``trt01`` ← ``trt02``, 256×256×160, about 100 manual labels) is
registered once with ``avsm register``'s default preset and the result is
cached as avsm's compact transform file (``--cache``; its maps are regenerated exactly),
so later runs time the outputs only.  Then, on the fixed image's own grid:

1. each output computed on its own, slab by slab as the pipeline does (forward world
   map, warped image, warped labels by the full transform and by the affine alone, det J,
   ``1Warp``, ``1InverseWarp``), and each file written on its own, with its size;
2. the whole output stage end to end, exactly the calls ``register_pair`` makes after the
   registration (:func:`avsm.pipeline.forward_outputs`, the NIfTI writes, Dice,
   :func:`avsm.export.itk.write_transforms`).

Run: ``PYTHONPATH=src python benchmarks/profile_outputs.py [--data-dir ../shared/data/oasis-trt20]
[--fixed trt01 --moving trt02] [--cache /tmp/avsm_profile_outputs.npz] [--threads 2]``

OASIS-TRT-20 may not be copied into the repository: outputs go to a temporary folder
that is removed at the end.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

log = logging.getLogger("profile_outputs")


class Timer:
    """Accumulates wall and CPU seconds (this process, all threads) per named output."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.sizes: dict[str, int] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return out


def get_result(args: argparse.Namespace, fixed: Any, moving: Any) -> tuple[Any, float | None]:
    """The registration (loaded from ``--cache`` when there) and its time in seconds (``None`` if loaded)."""
    from avsm import settings as S
    from avsm.api import register
    from avsm.export.compact import load_compact, save_compact

    if args.cache and os.path.isfile(args.cache) and not args.reregister:
        log.info("loading the cached registration %s", args.cache)
        return load_compact(args.cache), None
    t = time.perf_counter()
    name = getattr(S, "DEFAULT_PRESET", "fast")  # what `avsm register` uses by default
    result = register(fixed=fixed, moving=moving, settings=S.preset(name), progress=False)
    t_reg = time.perf_counter() - t
    if args.cache:
        save_compact(result, args.cache)
    return result, t_reg


def components(result: Any, mv: Any, ml: Any, out: str) -> Timer:
    """Each output on its own, as :func:`avsm.pipeline.forward_outputs` computes it (its slabs, float32
    maps), then the inverse field and each file written on its own."""
    from avsm.export.compact import save_compact
    from avsm.export.itk import field_slab, world_affine, write_displacement_nifti
    from avsm.io.nifti import write_nifti
    from avsm.transform import VolumeSampler, grid_affine_map, slab_ranges, world_jacobian_determinant

    tm = Timer()
    grid = result.fixed_original
    D = grid.shape[0]
    M = world_affine(result)
    img = tm("warped image", lambda: VolumeSampler(mv))
    lab = tm("warped labels", lambda: VolumeSampler(ml))
    warped = img.empty(grid.shape)
    labels = lab.empty(grid.shape)
    labels_aff = lab.empty(grid.shape)
    warp = np.empty((3, *grid.shape), dtype=np.float32)
    inv = np.empty((3, *grid.shape), dtype=np.float32)
    folds = 0
    for z0, z1 in slab_ranges(grid):
        a, b = max(z0 - 1, 0), min(z1 + 1, D)
        halo = grid.slab(a, b)
        wm = tm("forward world map", lambda: result.world_map(halo, dtype=torch.float32))
        det = tm("det J", lambda: world_jacobian_determinant(wm, halo)[z0 - a:z1 - a])
        folds += int((det < 0).sum())
        core = wm[:, :, z0 - a:z1 - a]
        warped[z0:z1] = tm("warped image", lambda: img(core))
        labels[z0:z1] = tm("warped labels", lambda: lab(core))
        sl = grid.slab(z0, z1)
        labels_aff[z0:z1] = tm("warped labels (affine only)",
                               lambda: lab(grid_affine_map(M @ sl.unit_to_world(), sl.shape, dtype=torch.float32)))
        warp[:, z0:z1] = tm("1Warp field", lambda: field_slab(result, "warp", sl, M, world=core, dtype=torch.float32))
    for z0, z1 in slab_ranges(grid):
        inv[:, z0:z1] = tm("1InverseWarp field", lambda: field_slab(result, "inverse_warp", grid.slab(z0, z1), M,
                                                                     dtype=torch.float32))
    files = {
        "warped.nii.gz": lambda p: write_nifti(warped, grid, p),
        "warped_labels.nii.gz": lambda p: write_nifti(labels, grid, p),
        "transform_1Warp.nii.gz": lambda p: write_displacement_nifti(warp, grid, p),
        "transform_1InverseWarp.nii.gz": lambda p: write_displacement_nifti(inv, grid, p),
        "transform_avsm.npz": lambda p: save_compact(result, p),
    }
    for name, write in files.items():
        p = os.path.join(out, name)
        tm("write " + name, lambda: write(p))
        tm.sizes["write " + name] = os.path.getsize(p)
    log.info("folds %d", folds)
    return tm


def end_to_end(result: Any, fv: Any, mv: Any, fl: Any, ml: Any, out: str) -> tuple[float, float]:
    """Wall and CPU seconds of what ``register_pair`` does after the registration (summary JSON aside)."""
    from avsm.export.itk import write_transforms
    from avsm.io.nifti import write_nifti
    from avsm.io.outputs import OutputTransaction
    from avsm.metrics.overlap import dice_per_label, shared_labels
    from avsm.pipeline import forward_outputs

    t, c = time.perf_counter(), time.process_time()
    with OutputTransaction() as tx:
        fwd = forward_outputs(result, mv, ml, labels_affine=True, warp_field=True)
        write_nifti(fwd.warped, fv.grid, tx.path(os.path.join(out, "warped.nii.gz")))
        write_nifti(fwd.labels, fv.grid, tx.path(os.path.join(out, "warped_labels.nii.gz")))
        scored = shared_labels(fl.array, ml.array, None)
        dice_per_label(fwd.labels, fl.array, labels=scored)
        dice_per_label(fwd.labels_affine, fl.array, labels=scored)
        fields = {"warp": fwd.warp_field}
        fwd = None
        write_transforms(result, os.path.join(out, "transform_"), tx, fields=fields)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "oasis-trt20"))
    ap.add_argument("--fixed", default="trt01")
    ap.add_argument("--moving", default="trt02")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "avsm_profile_outputs_avsm.npz"),
                    help="compact transform file of the registration (loaded when present, else written)")
    ap.add_argument("--reregister", action="store_true", help="register even when the cache exists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-end-to-end", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from avsm.io.image import load_image

    d = args.data_dir
    if not os.path.isdir(d):
        raise SystemExit(f"no data folder {d} (OASIS-TRT-20 lives in ../shared/data only)")
    fv = load_image(os.path.join(d, args.fixed + ".nii.gz"))
    mv = load_image(os.path.join(d, args.moving + ".nii.gz"))
    fl = load_image(os.path.join(d, args.fixed + "_labels.nii.gz"), label=True)
    ml = load_image(os.path.join(d, args.moving + "_labels.nii.gz"), label=True)
    result, t_reg = get_result(args, fv, mv)
    n_labels = len(np.unique(ml.array))
    log.info("pair %s <- %s, fixed grid %s (%.1f M voxels), %d moving labels, registration %s",
             args.fixed, args.moving, fv.grid.shape, math.prod(fv.grid.shape) / 1e6, n_labels,
             "loaded from cache" if t_reg is None else f"{t_reg:.1f} s")
    out = tempfile.mkdtemp(prefix="avsm_profile_outputs_")
    try:
        tm = components(result, mv, ml, out)
        total = None if args.skip_end_to_end else end_to_end(result, fv, mv, fl, ml, tempfile.mkdtemp(dir=out))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = ["| output | wall (s) | CPU (s) | size (MB) |", "|---|---|---|---|"]
    for name, s in tm.seconds.items():
        size = tm.sizes.get(name)
        lines.append(f"| {name} | {s:.2f} | {tm.cpu[name]:.2f} | {'' if size is None else f'{size / 1e6:.1f}'} |")
    lines.append(f"| **sum of the above** | {sum(tm.seconds.values()):.2f} | {sum(tm.cpu.values()):.2f} | "
                 f"{sum(tm.sizes.values()) / 1e6:.1f} |")
    if total is not None:
        lines.append("| **whole output stage, end to end** (forward_outputs, writes, Dice, write_transforms) | "
                     f"{total[0]:.2f} | {total[1]:.2f} | |")
    if t_reg is not None:
        lines.append(f"| (registration, for comparison) | {t_reg:.2f} | | |")
    log.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
