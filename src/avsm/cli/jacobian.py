"""``avsm jacobian``: det J image of a transform on a reference grid, and its fold count."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import SimpleITK as sitk
import torch

from avsm.io.geometry import Grid
from avsm.io.image import Volume, save_image
from avsm.io.outputs import OutputTransaction
from avsm.transform import grid_world_points, world_jacobian_determinant


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``jacobian`` sub-command."""
    p = sub.add_parser("jacobian", help="write the Jacobian determinant of a transform and count folds")
    p.add_argument("--transform", nargs="+", required=True,
                   help="transform files in antsApplyTransforms order (e.g. transform_1Warp.nii.gz "
                        "transform_0GenericAffine.mat, transform_Composite.nii.gz, or avsm's compact "
                        "transform_avsm.npz alone)")
    p.add_argument("--reference", required=True, help="image whose grid the determinant is computed on")
    p.add_argument("--out", required=True, help="output det J image (NIfTI/NRRD/MHA)")
    p.add_argument("--log", action="store_true", help="write log(det J) (non-positive values become NaN)")
    from avsm.threads import add_threads_argument

    add_threads_argument(p)
    p.set_defaults(func=run)


def world_map_of(transform: sitk.Transform, grid: Grid) -> torch.Tensor:
    """World points ``T(x)`` for every voxel ``x`` of ``grid``: ``(1, 3, D, H, W)`` float64."""
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(grid.reference_image())
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(f.Execute(transform))  # (D, H, W, 3) LPS mm, ITK order
    return grid_world_points(grid) + torch.from_numpy(np.moveaxis(disp, -1, 0))[None]


def run(args: argparse.Namespace) -> int:
    """Run ``avsm jacobian``."""
    from avsm.export.itk import load_transform

    from avsm.errors import AvsmError
    from avsm.export.compact import is_compact, load_compact
    from avsm.export.itk import parse_transform_spec

    from avsm.cli.warp import reference_grid

    from avsm.threads import apply_threads, resolve_threads

    apply_threads(resolve_threads(getattr(args, "threads", None)))
    grid = reference_grid(args.reference)
    specs = [parse_transform_spec(t) for t in args.transform]
    compact = [p for p, _ in specs if is_compact(p)]
    if compact and len(specs) != 1:
        raise AvsmError("an avsm transform file (.npz) must be the only --transform", compact[0])
    with OutputTransaction(inputs=[args.reference, *(p for p, _ in specs)]) as tx:
        out = tx.path(args.out)
        if compact:
            if specs[0][1]:
                raise AvsmError("avsm jacobian computes det J of the forward transform; give the file "
                                "without [..,1]", compact[0])
            det = load_compact(compact[0]).jacobian_determinant(grid).astype(np.float64)
        else:
            det = world_jacobian_determinant(world_map_of(load_transform(args.transform), grid), grid)
        folds = int((det < 0).sum())
        arr = np.log(np.where(det > 0, det, np.nan)) if args.log else det
        save_image(Volume(arr.astype(np.float32), grid), out)
    sys.stdout.write(f"folds (det J < 0): {folds} of {det.size} voxels ({100.0 * folds / det.size:.4f} %); "
                     f"det J min {det.min():.4f} max {det.max():.4f}\n")
    return 0
