"""``avsm warp``: apply avsm, ANTs or ITK transforms to an image or label map.

Transforms are given in ``antsApplyTransforms`` order (the first listed is
applied first to a reference-space point), e.g.::

    avsm warp --moving moving.nii.gz --reference fixed.nii.gz \\
        --transform out/pair_1Warp.nii.gz out/pair_0GenericAffine.mat --out warped.nii.gz
    avsm warp --moving seg.nii.gz --reference fixed.nii.gz --transform out/pair_ --interp label --out seg_w.nii.gz
    avsm warp --moving fixed.nii.gz --reference moving.nii.gz --transform "[out/pair_0GenericAffine.mat,1]" \\
        out/pair_1InverseWarp.nii.gz --out back.nii.gz

A ``--transform`` item may be a transform file (``.mat``, ``.tfm``, ``.txt``,
``.h5``), a displacement-field image (LPS mm vectors), an ANTs spec
``[file,1]`` (inverted linear transform), an avsm/ANTs output prefix
(``P`` with ``P0GenericAffine.mat`` ... or ``PComposite.h5`` next to it; ``--inverse`` picks the
moving → fixed direction), or avsm's compact transform file ``P avsm.npz``
(alone; ``--inverse`` or ``[file,1]`` for the inverse), whose maps are
regenerated exactly from the stored velocities on the reference grid.
Resampling is done by SimpleITK, or by avsm for the compact file.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import SimpleITK as sitk

import numpy as np

from avsm.errors import AvsmError
from avsm.export.compact import is_compact, load_compact
from avsm.export.itk import load_transform, parse_transform_spec, transform_paths_for_prefix
from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image, save_image
from avsm.io.outputs import OutputTransaction

log = logging.getLogger(__name__)

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "label": sitk.sitkLabelGaussian,  # per-label Gaussian vote: never invents a label value
}

_INTEGER_PIXELS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}


def add_parser(subparsers: Any) -> None:
    """Register ``avsm warp`` on ``subparsers`` (an ``argparse`` sub-parsers action)."""
    p = subparsers.add_parser(
        "warp",
        help="apply avsm/ANTs/ITK transforms to an image or label map",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--moving", "-m", required=True, help="image or label map to warp")
    p.add_argument("--reference", "-r", required=True, help="image whose grid the output takes")
    p.add_argument("--transform", "-t", required=True, nargs="+",
                   help="transforms in antsApplyTransforms order (file, [file,1] or avsm prefix)")
    p.add_argument("--out", "-o", required=True, help="output image")
    p.add_argument("--interp", choices=tuple(INTERPOLATORS), default="linear",
                   help="linear (images), nearest, or label (label maps; never invents labels)")
    p.add_argument("--inverse", action="store_true",
                   help="with an avsm prefix or compact avsm.npz: use the inverse (moving -> fixed) transform")
    p.add_argument("--default", type=float, default=0.0, help="value outside the moving image")
    from avsm.threads import add_threads_argument

    add_threads_argument(p)
    p.set_defaults(func=run)


def reference_grid(path: str) -> Grid:
    """Geometry of the reference image (header only)."""
    if not os.path.isfile(path):
        raise AvsmError("file not found" if not os.path.exists(path) else "not a file", path)
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise AvsmError("cannot read reference image (corrupt or unknown format)", path) from e
    size, dim = r.GetSize(), r.GetDimension()
    if dim == 4 and size[3] == 1:
        d = r.GetDirection()
        direction = (d[0], d[1], d[2], d[4], d[5], d[6], d[8], d[9], d[10])
        spacing, origin = r.GetSpacing()[:3], r.GetOrigin()[:3]
    elif dim == 3:
        direction, spacing, origin = r.GetDirection(), r.GetSpacing(), r.GetOrigin()
    else:
        raise AvsmError(f"reference image is {dim}-D; expected 3-D", path)
    try:
        return Grid(shape=(size[2], size[1], size[0]), spacing=spacing, origin=origin, direction=direction)
    except ValueError as e:
        raise AvsmError(f"invalid reference geometry: {e}", path) from e


def _is_integer_image(path: str) -> bool:
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return False  # load_image reports the problem
    return r.GetPixelID() in _INTEGER_PIXELS


def expand_transforms(items: list[str], *, inverse: bool = False) -> list[tuple[str, bool]]:
    """Resolve ``--transform`` items to ``[(path, invert), ...]`` in ANTs order.

    An item that is not an existing file but an avsm/ANTs output prefix is
    expanded to its composite (or affine + warp) files.

    Raises:
        AvsmError: an item is neither a file nor a known prefix.
    """
    out: list[tuple[str, bool]] = []
    for item in items:
        path, inv = parse_transform_spec(item)
        if os.path.exists(path):
            out.append((path, inv))
            continue
        found = transform_paths_for_prefix(path, inverse=inverse)
        if found is None:
            raise AvsmError("transform file not found (nor an avsm output prefix)", path)
        out.extend(found)
    return out


def warp_file(moving: str, reference: str, transforms: list[str], out: str, *,
              interp: str = "linear", inverse: bool = False, default: float = 0.0) -> str:
    """Warp ``moving`` onto ``reference``'s grid through ``transforms`` and write ``out`` atomically.

    Args:
        moving: image (or label map with ``interp`` ``label``/``nearest``) file.
        reference: image whose grid (shape, spacing mm, origin, direction) the output takes.
        transforms: ANTs-order list (see :func:`expand_transforms`).
        out: output file (must not be an input).
        interp: ``linear`` (float32 output), ``nearest`` or ``label`` (input dtype kept).
        inverse: for avsm prefixes, use the inverse direction.
        default: value for points outside the moving image.

    Returns:
        ``out``.

    Raises:
        AvsmError: bad input file or transform, or unwritable/forbidden output.
    """
    if interp not in INTERPOLATORS:
        raise AvsmError(f"unknown interpolation {interp!r}; choose one of {', '.join(INTERPOLATORS)}")
    as_label = interp == "label" or (interp == "nearest" and _is_integer_image(moving))
    vol = load_image(moving, label=as_label)
    grid = reference_grid(reference)
    items = expand_transforms(list(transforms), inverse=inverse)
    compact = [p for p, _ in items if is_compact(p)]
    if compact:
        if len(items) != 1:
            raise AvsmError("an avsm transform file (.npz) must be the only --transform", compact[0])
        path, inv = items[0]
        warped_vol = _warp_compact(vol, grid, (path, inv or inverse), interp, default)
        with OutputTransaction(inputs=[moving, reference, compact[0]]) as tx:
            save_image(warped_vol, tx.path(out))
        log.info("wrote %s", out)
        return out
    tr = load_transform(items)
    src = vol.to_sitk()
    if not as_label:
        src = sitk.Cast(src, sitk.sitkFloat32)
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(grid.reference_image())
    f.SetTransform(tr)
    f.SetInterpolator(INTERPOLATORS[interp])
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(src.GetPixelID())
    try:
        warped = f.Execute(src)
    except RuntimeError as e:
        raise AvsmError(f"resampling failed: {str(e).strip().splitlines()[-1][:160]}", moving) from e
    inputs = [moving, reference] + [p for p, _ in items]
    with OutputTransaction(inputs=inputs) as tx:
        try:
            sitk.WriteImage(warped, tx.path(out), True)
        except RuntimeError as e:
            raise AvsmError("cannot write image (unknown extension or unwritable)", out) from e
    log.info("wrote %s", out)
    return out


def _warp_compact(vol: Volume, grid: Grid, item: tuple[str, bool], interp: str, default: float) -> Volume:
    """Warp ``vol`` onto ``grid`` through an avsm compact transform (``item = (path, inverse)``)."""
    path, inverse = item
    result = load_compact(path)
    if default != 0.0:
        if interp != "linear":
            raise AvsmError("--default other than 0 needs --interp linear with an avsm transform file", path)
        shifted = Volume(vol.array.astype(np.float32) - np.float32(default), vol.grid, vol.path)
        w = result.warp(shifted, onto=grid, inverse=inverse, mode="linear")
        return Volume(w.array + np.float32(default), grid, vol.path)
    return result.warp(vol, onto=grid, inverse=inverse, mode=interp)


def run(args: argparse.Namespace) -> int:
    """``avsm warp`` entry point; returns 0 (errors raise :class:`AvsmError`)."""
    from avsm.threads import apply_threads, resolve_threads

    apply_threads(resolve_threads(getattr(args, "threads", None)))
    warp_file(args.moving, args.reference, args.transform, args.out, interp=args.interp,
              inverse=args.inverse, default=args.default)
    return 0
