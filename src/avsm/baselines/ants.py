"""ANTs through antspyx (optional: ``pip install avsm[baselines]``).

Methods (each is one ``ants.registration(fixed, moving, type_of_transform=...)`` call;
what antspyx 0.6.3 runs for it was read from ``ants/registration/registration.py``):

* ``ants-syn``: ``type_of_transform='SyN'`` (Mattes affine, then SyN
  with Mattes, 40x20x0 iterations: the finest level gets no SyN iteration; fast).
* ``ants-syncc``: the paper's setting, ``'SyNCC'``: rigid + affine with
  Mattes MI, then SyN[0.15,3,0] with CC radius 4 over four levels
  (2100x1200x1200x20, shrink 4x3x2x1, smoothing 3x2x1x0 voxels).
* ``ants-syn-cc``: ``type_of_transform='antsRegistrationSyN[s]'``, antspyx's
  recreation of ANTs' ``antsRegistrationSyN.sh -t s``; the command it builds is::

      antsRegistration -d 3 -r [F,M,1]          # centres of mass
        --transform Rigid[0.1]  --metric MI[F,M,1,32,Regular,0.25]
          --convergence [1000x500x250x100,1e-6,10] --shrink-factors 8x4x2x1 --smoothing-sigmas 3x2x1x0vox
        --transform Affine[0.1] --metric MI[F,M,1,32,Regular,0.25]
          --convergence [1000x500x250x100,1e-6,10] --shrink-factors 8x4x2x1 --smoothing-sigmas 3x2x1x0vox
        --transform SyN[0.2,3,0] --metric CC[F,M,1,2]
          --convergence [100x70x50x20,1e-6,10]     --shrink-factors 8x4x2x1 --smoothing-sigmas 3x2x1x0vox
        -x [NA,NA] --random-seed 42 --float 1 --write-composite-transform 0

  i.e. rigid then affine (Mattes MI, 32 bins, 25 % regular sampling, gradient step 0.1),
  then SyN (gradient step 0.2, update-field variance 3, total-field 0) with
  cross-correlation of radius 2 (a 5³ window), 100/70/50/20 iterations at shrink
  8/4/2/1 with smoothing 3/2/1/0 voxels; every stage stops early when the metric
  changes by less than 1e-6 over 10 iterations.  It is not the shell script
  exactly: ``antsRegistrationSyN.sh`` (as in ANTs' repository) defaults to CC
  radius 4 and SyN step 0.1, winsorises intensities to [0.005, 0.995], computes in
  double precision and switches to a 5-level schedule for images wider than 256
  voxels; antspyx uses radius 2, step 0.2, no winsorising, single precision and
  the 4 levels above whatever the size (our working grids are far below 256).
* ``ants-syn-quick``: ``type_of_transform='antsRegistrationSyNQuick[s]'``
  (``antsRegistrationSyNQuick.sh -t s``): the same three stages with the finest
  level skipped everywhere (rigid/affine 1000x500x250x0, SyN 100x70x50x0) and SyN
  driven by Mattes MI with 32 bins (``MI[F,M,1,32]``) instead of CC.

All run on the same inputs as avsm (:func:`avsm.baselines.base.working_inputs`:
canonical ≈2 mm grids, intensities in [0, 1]).  ANTs' forward and inverse
transforms are composed by ``antsApplyTransforms`` into dense displacement
fields (LPS mm, pull-back), which become :class:`WorldTransform` objects;
``timings['registration']`` is the ``ants.registration`` call alone.

antspyx hard-codes the ``antsRegistrationSyN*`` schedules (``reg_iterations`` and
the other keyword arguments do not reach them); ``convergence=`` (tests only)
replaces the ``--convergence`` values of the command antspyx built, stage by stage.

Determinism: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set to 2 (unless
already set) *before* ANTs is imported, and the random seed is passed; with 2
threads ANTs is still not bit-reproducible (see the peer-tools notes), set the
variable to 1 for that.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from avsm.baselines._convert import itk_affine_file_matrix, read_displacement_field
from avsm.baselines.base import FieldResult, MethodUnavailable, WorldTransform, working_inputs
from avsm.io.image import Volume

__all__ = ["ants_syn", "ants_syncc", "ants_syn_cc", "ants_syn_quick", "ants_register", "to_ants", "import_ants",
           "warmup"]

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


@contextlib.contextmanager
def _replace_convergence(convergence: Sequence[str] | None) -> Iterator[None]:
    """While active, ``ants.registration`` runs with its ``--convergence`` values replaced, in order.

    antspyx builds the ``antsRegistrationSyN*`` commands with fixed schedules; this swaps
    them in the argument list it hands to the ANTs library (tests use it to run few
    iterations).  ``None``: no change.
    """
    if convergence is None:
        yield
        return
    mod = importlib.import_module("ants.registration.registration")
    orig = mod.get_lib_fn
    values = list(convergence)

    def get_lib_fn(name: str) -> Any:
        fn = orig(name)
        if name != "antsRegistration":
            return fn

        def run(args: list[str]) -> Any:
            args = list(args)
            idx = [i + 1 for i, a in enumerate(args) if a == "--convergence"]
            if len(idx) != len(values):
                raise ValueError(f"convergence: {len(values)} values for {len(idx)} stages")
            for i, v in zip(idx, values):
                args[i] = v
            return fn(args)

        return run

    mod.get_lib_fn = get_lib_fn
    try:
        yield
    finally:
        mod.get_lib_fn = orig


def ants_register(
    fixed: Volume,
    moving: Volume,
    *,
    type_of_transform: str = "SyN",
    spacing: float | None = 2.0,
    seed: int = 42,
    inverse: bool = True,
    keep_warped: bool = False,
    convergence: Sequence[str] | None = None,
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
        with _replace_convergence(convergence):
            reg = ants.registration(fixed=F, moving=M, type_of_transform=type_of_transform,
                                    outprefix=os.path.join(tmp, "reg_"), **{"verbose": False, **ants_kwargs})
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
        info: dict[str, Any] = {"type_of_transform": type_of_transform, "seed": seed, "convergence": convergence,
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


def ants_syn_cc(fixed: Volume, moving: Volume, **opts: Any) -> FieldResult:
    """``ants.registration(fixed, moving, type_of_transform='antsRegistrationSyN[s]')``: rigid + affine (MI),
    then SyN with CC radius 2, 100x70x50x20 at shrink 8x4x2x1 (module docstring)."""
    res = ants_register(fixed, moving, type_of_transform="antsRegistrationSyN[s]", **opts)
    res.method = "ants-syn-cc"
    return res


def ants_syn_quick(fixed: Volume, moving: Volume, **opts: Any) -> FieldResult:
    """``ants.registration(fixed, moving, type_of_transform='antsRegistrationSyNQuick[s]')``: as ``ants-syn-cc``
    without the finest level and with MI (32 bins) for SyN (module docstring)."""
    res = ants_register(fixed, moving, type_of_transform="antsRegistrationSyNQuick[s]", **opts)
    res.method = "ants-syn-quick"
    return res
