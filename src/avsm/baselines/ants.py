"""ANTs SyN through antspyx (optional: ``pip install avsm[baselines]``).

Methods:

* ``ants-syn``: antspyx ``type_of_transform='SyN'`` (Mattes affine, then SyN
  with Mattes, 40x20x0 iterations: the finest level gets no SyN iteration; fast).
* ``ants-syncc``: the paper's setting, antspyx ``'SyNCC'``: rigid + affine with
  Mattes MI, then SyN[0.15,3,0] with CC radius 4 over four levels
  (2100x1200x1200x20, shrink 4x3x2x1, smoothing 3x2x1x0 voxels).

Both run on the same inputs as avsm (:func:`avsm.baselines.base.working_inputs`:
canonical ≈2 mm grids, intensities in [0, 1]).  ANTs' forward and inverse
transforms are composed by ``antsApplyTransforms`` into dense displacement
fields (LPS mm, pull-back), which become :class:`WorldTransform` objects.

Determinism: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set to 2 (unless
already set) *before* ANTs is imported, and the random seed is passed; with 2
threads ANTs is still not bit-reproducible (see the peer-tools notes), set the
variable to 1 for that.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from avsm.baselines._convert import itk_affine_file_matrix, read_displacement_field
from avsm.baselines.base import FieldResult, MethodUnavailable, WorldTransform, working_inputs
from avsm.io.image import Volume

__all__ = ["ants_syn", "ants_syncc", "ants_register", "to_ants", "import_ants", "warmup"]

log = logging.getLogger(__name__)


def import_ants() -> Any:
    """Import antspyx with the thread count fixed first (raises :class:`MethodUnavailable`)."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    try:
        import ants  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MethodUnavailable(f"antspyx is not installed ({e}); pip install 'avsm[baselines]'") from e
    return ants


def warmup() -> None:
    """Import antspyx now (about 10 s), so that method timings exclude the import."""
    import_ants()


def to_ants(volume: Volume) -> Any:
    """An ``ants.ANTsImage`` (float32) with the volume's voxels and world geometry."""
    ants = import_ants()
    arr = np.ascontiguousarray(volume.array.astype(np.float32).transpose(2, 1, 0))  # ITK (x, y, z)
    g = volume.grid
    return ants.from_numpy(arr, origin=list(g.origin), spacing=list(g.spacing),
                           direction=g.direction_matrix.copy())


def ants_register(
    fixed: Volume,
    moving: Volume,
    *,
    type_of_transform: str = "SyN",
    spacing: float | None = 2.0,
    seed: int = 42,
    inverse: bool = True,
    keep_warped: bool = False,
    **ants_kwargs: Any,
) -> FieldResult:
    """Register with ``ants.registration`` and convert the result to world transforms.

    Args:
        fixed, moving: intensity volumes (any geometry).
        type_of_transform: antspyx transform name (``SyN``, ``SyNCC``, ``Affine`` ...).
        spacing: working-grid spacing in mm (``None``: the images' own spacing).
        seed: ANTs ``--random-seed``.
        inverse: also compose the inverse field (on the moving working grid).
        keep_warped: keep ANTs' own warped moving image in ``info['ants_warped']``
            (a :class:`Volume` on the fixed working grid) and warped fixed image in
            ``info['ants_warped_fixed']`` (moving working grid), for tests.
        **ants_kwargs: passed to ``ants.registration``.

    Returns:
        :class:`FieldResult`; ``timings`` has ``prepare``, ``registration``, ``convert``.
    """
    ants = import_ants()
    ants.config._random_seed = int(seed)
    t0 = time.perf_counter()
    fw, mw = working_inputs(fixed, moving, spacing)
    F, M = to_ants(fw), to_ants(mw)
    timings = {"prepare": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory(prefix="avsm-ants-") as tmp:
        t1 = time.perf_counter()
        reg = ants.registration(fixed=F, moving=M, type_of_transform=type_of_transform,
                                outprefix=os.path.join(tmp, "reg_"), verbose=False, **ants_kwargs)
        timings["registration"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        fwd = list(reg["fwdtransforms"])
        inv = list(reg["invtransforms"])
        fpath = ants.apply_transforms(fixed=F, moving=M, transformlist=fwd, compose=os.path.join(tmp, "fwd_"))
        fgrid, ffield = read_displacement_field(fpath)
        inverse_tx = None
        if inverse:
            which = [t.endswith(".mat") for t in inv]
            ipath = ants.apply_transforms(fixed=M, moving=F, transformlist=inv, whichtoinvert=which,
                                          compose=os.path.join(tmp, "inv_"))
            igrid, ifield = read_displacement_field(ipath)
            inverse_tx = WorldTransform(field_grid=igrid, field=ifield)
        mats = [t for t in fwd if t.endswith(".mat")]
        affine = itk_affine_file_matrix(mats[0]) if len(mats) == 1 else None
        info: dict[str, Any] = {"type_of_transform": type_of_transform, "seed": seed,
                                "threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
        if keep_warped:
            w = reg["warpedmovout"]
            info["ants_warped"] = Volume(np.ascontiguousarray(w.numpy().transpose(2, 1, 0)).astype(np.float32),
                                         fw.grid)
            wf = reg["warpedfixout"]
            info["ants_warped_fixed"] = Volume(
                np.ascontiguousarray(wf.numpy().transpose(2, 1, 0)).astype(np.float32), mw.grid)
            info["fixed_work"], info["moving_work"] = fw, mw
        timings["convert"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return FieldResult(
        fixed_original=fixed.grid, moving_original=moving.grid,
        forward=WorldTransform(field_grid=fgrid, field=ffield), inverse=inverse_tx,
        affine_forward=affine, method=f"ants-{type_of_transform.lower()}", timings=timings, info=info,
    )


def ants_syn(fixed: Volume, moving: Volume, **opts: Any) -> FieldResult:
    """antspyx default ``SyN`` (fast; no SyN iterations at the finest level)."""
    res = ants_register(fixed, moving, type_of_transform="SyN", **opts)
    res.method = "ants-syn"
    return res


def ants_syncc(fixed: Volume, moving: Volume, **opts: Any) -> FieldResult:
    """The paper's ANTs setting (``SyNCC``: Mattes affine, SyN with CC radius 4, 4 levels, 3/2/1/0)."""
    res = ants_register(fixed, moving, type_of_transform="SyNCC", **opts)
    res.method = "ants-syncc"
    return res
