"""FireANTs (Jena et al., Nat. Commun. 2024) on the CPU (optional: see below for the install).

Method ``fireants``: FireANTs' own pipeline for brain MRI, in its own classes, run on
avsm's working inputs (:func:`avsm.baselines.base.working_inputs`: canonical ≈2 mm grids,
intensities in [0, 1]), every image on ``device='cpu'``::

    F = BatchedImages([Image.load_file(fixed_path, device="cpu")])
    M = BatchedImages([Image.load_file(moving_path, device="cpu")])
    # 1. initial moving transform: centres of mass (as the FireANTs CLI's
    #    --initial-moving-transform [F,M,1], and ANTs' -r [F,M,1])
    mom = MomentsRegistration(1, F, M, moments=1, orientation="rot")
    mom.optimize()
    # 2. affine: its LPBA40 paper script (fireants/scripts/pairwise/test_lpba40.py)
    aff = AffineRegistration([8, 4, 2, 1], [100, 50, 25, 20], F, M, loss_type="cc",
                             optimizer="Adam", optimizer_lr=3e-4, optimizer_params={},
                             cc_kernel_size=5, init_rigid=mom.get_affine_init())
    aff.optimize()
    # 3. deformable: the same script's greedy stage
    reg = GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50],
                             fixed_images=F, moving_images=M, loss_type="cc",
                             cc_kernel_size=7, deformation_type="compositive",
                             smooth_grad_sigma=2, smooth_warp_sigma=0.5,
                             optimizer="adam", optimizer_lr=0.5,
                             init_affine=aff.get_affine_matrix().detach())
    reg.optimize()
    reg.save_as_ants_transforms("fwd_0Warp.nii.gz")

That is: LNCC (rectangular window 7 voxels) with Adam (lr 0.5) on a compositive warp,
three scales 4-2-1 with 200/100/50 iterations, the update's gradient smoothed with σ = 2
voxels and the warp with σ = 0.5 voxel, stopping early when the loss changes by less
than 1e-6 over 10 iterations (the class defaults).  ``algorithm="syn"`` runs the
script's SyN stage instead (``SyNRegistration``, 100/75/50 iterations, LNCC 5, gradient
σ 1, Adam lr 0.5).  The script used ``loss_type="fusedcc"`` on the GPU and ``"cc"`` on
the CPU, where its fused CUDA kernels do not exist; the two are the same metric.  On
the CPU the script skipped the affine stage (its LPBA40 pairs are pre-aligned); ours
are not, hence the moments and affine stages.  With the script's Adam lr 3e-4 the
affine's translation hardly moves (its unit is the mm), so the centre-of-mass
initialisation carries the translation, as in ANTs.

``save_as_ants_transforms`` writes the full map (the affine folded in) as an ITK
displacement field on the fixed working grid (LPS mm, pull-back: ``x -> x + u(x)`` is
the moving-world point), which becomes a :class:`WorldTransform`; ``affine_forward`` is
``aff.get_affine_matrix()`` (world LPS mm, fixed → moving).  ``inverse=True`` also
writes FireANTs' own inverse (``save_as_ants_transforms(..., save_inverse=True)``, an
iterative inversion on the moving grid; extra time, not in ``registration``).

``timings['registration']`` is the tool's own time (the three ``optimize()`` calls);
``moments``, ``affine`` and ``deformable`` split it.  ``export`` is its
``save_as_ants_transforms`` call (part of ``convert``); for ``algorithm="syn"`` it holds
FireANTs' iterative inversion of the reverse half-warp, which its SyN map needs.

Install: ``pip install --no-deps fireants hydra-core "omegaconf>=2.2,<2.4"
antlr4-python3-runtime==4.9.3`` (a plain ``pip install fireants`` pins SimpleITK 2.2.1
and so downgrades it; the extra ``avsm[fireants]`` brings the three companions, FireANTs
itself still goes in with ``--no-deps``).  This adapter needs only ``fireants`` (its other
requirements, torch, SimpleITK, numpy, scipy, tqdm, are avsm's own).  Without it the
method raises :class:`MethodUnavailable` with that advice.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from avsm.baselines._convert import read_displacement_field
from avsm.baselines.base import FieldResult, MethodUnavailable, WorldTransform, working_inputs
from avsm.io.image import Volume

__all__ = ["fireants", "fireants_register", "import_fireants", "warmup", "LPBA40_GREEDY", "LPBA40_SYN",
           "LPBA40_AFFINE"]

log = logging.getLogger(__name__)

INSTALL = ('pip install --no-deps fireants hydra-core "omegaconf>=2.2,<2.4" antlr4-python3-runtime==4.9.3 '
           "(a plain 'pip install fireants' downgrades SimpleITK)")

#: affine stage of FireANTs' LPBA40 script (scripts/pairwise/test_lpba40.py)
LPBA40_AFFINE: dict[str, Any] = {"scales": (8, 4, 2, 1), "iterations": (100, 50, 25, 20), "loss_type": "cc",
                                 "optimizer": "Adam", "optimizer_lr": 3e-4, "cc_kernel_size": 5}
#: its greedy stage (``--algo greedy``)
LPBA40_GREEDY: dict[str, Any] = {"scales": (4, 2, 1), "iterations": (200, 100, 50), "loss_type": "cc",
                                 "cc_kernel_size": 7, "deformation_type": "compositive", "smooth_grad_sigma": 2.0,
                                 "smooth_warp_sigma": 0.5, "optimizer": "adam", "optimizer_lr": 0.5}
#: its SyN stage (``--algo syn``)
LPBA40_SYN: dict[str, Any] = {"scales": (4, 2, 1), "iterations": (100, 75, 50), "loss_type": "cc",
                              "cc_kernel_size": 5, "deformation_type": "compositive", "smooth_grad_sigma": 1.0,
                              "optimizer": "adam", "optimizer_lr": 0.5}


def import_fireants() -> dict[str, Any]:
    """FireANTs' classes (``Image``, ``BatchedImages``, ``MomentsRegistration``, ``AffineRegistration``,
    ``GreedyRegistration``, ``SyNRegistration``).

    Its import prints to stdout, warns that its fused CUDA kernels are missing and calls
    ``logging.basicConfig(level=INFO)``; all of it is undone (stdout captured, logging
    silenced during the import, the root logger's handlers and level restored) and its
    loggers are set to ERROR.

    Raises:
        MethodUnavailable: FireANTs is not installed (the message gives the install line).
    """
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(logging.WARNING)  # its "fused CUDA ops not found" warnings (expected on the CPU)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from fireants.io.image import BatchedImages, Image  # noqa: PLC0415
            from fireants.registration.affine import AffineRegistration  # noqa: PLC0415
            from fireants.registration.greedy import GreedyRegistration  # noqa: PLC0415
            from fireants.registration.moments import MomentsRegistration  # noqa: PLC0415
            from fireants.registration.syn import SyNRegistration  # noqa: PLC0415
    except ImportError as e:
        raise MethodUnavailable(f"fireants is not installed ({e}); {INSTALL}") from e
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        logging.disable(disabled)
    for name in ("fireants", "fireants.registration", "fireants.io", "fireants.interpolator"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("fireants"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return {"Image": Image, "BatchedImages": BatchedImages, "MomentsRegistration": MomentsRegistration,
            "AffineRegistration": AffineRegistration, "GreedyRegistration": GreedyRegistration,
            "SyNRegistration": SyNRegistration}


def warmup() -> None:
    """Import FireANTs now, so that method timings exclude the import."""
    import_fireants()


def _stage(defaults: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    kw = dict(defaults)
    kw.update(override or {})
    kw["scales"] = [int(s) if float(s).is_integer() else float(s) for s in kw["scales"]]
    kw["iterations"] = [int(i) for i in kw["iterations"]]
    if len(kw["scales"]) != len(kw["iterations"]):
        raise ValueError(f"scales {kw['scales']} and iterations {kw['iterations']} differ in length")
    return kw


def fireants_register(
    fixed: Volume,
    moving: Volume,
    *,
    algorithm: str = "greedy",
    spacing: float | None = 2.0,
    moments: int | None = 1,
    affine: bool = True,
    affine_opts: dict[str, Any] | None = None,
    deformable_opts: dict[str, Any] | None = None,
    iterations: Sequence[int] | None = None,
    affine_iterations: Sequence[int] | None = None,
    inverse: bool = False,
    threads: int | None = None,
    seed: int = 42,
    transform_dir: str | None = None,
    keep_warped: bool = False,
) -> FieldResult:
    """Register with FireANTs (moments → affine → greedy or SyN) and convert to world transforms.

    Args:
        fixed, moving: intensity volumes (any geometry).
        algorithm: ``greedy`` (default) or ``syn``: the deformable stage of the LPBA40 script.
        spacing: working-grid spacing in mm (``None``: the images' own spacing).
        moments: order of the moments initialisation (1: centres of mass; 2: also the
            principal axes), ``None`` for none.
        affine: run the affine stage.
        affine_opts, deformable_opts: keyword arguments replacing the defaults
            (:data:`LPBA40_AFFINE`, :data:`LPBA40_GREEDY` / :data:`LPBA40_SYN`), e.g.
            ``{"iterations": (20, 10, 5)}``.
        iterations, affine_iterations: shortcuts for the stages' ``iterations`` (tests use
            few; the defaults are the script's).
        inverse: also convert FireANTs' inverse warp (greedy only; an extra iterative
            inversion with the stage's scales and iterations).
        threads: ``torch.set_num_threads`` during the run (``None``: as set; restored after).
        seed: ``torch.manual_seed`` before the run.
        transform_dir: keep the ANTs transforms FireANTs wrote there
            (``fwd_0Warp.nii.gz``, ``aff_0GenericAffine.mat``, ``inv_0InverseWarp.nii.gz``),
            listed in ``info['ants_transforms']``; else they go with a temporary folder.
        keep_warped: keep FireANTs' own warped moving image (``reg.evaluate``) in
            ``info['tool_warped']`` (fixed working grid) and the working inputs in
            ``info['fixed_work']`` / ``info['moving_work']``, for tests.

    Returns:
        :class:`FieldResult`; ``timings`` has ``prepare``, ``moments``, ``affine``,
        ``deformable``, ``registration`` (their sum), ``export`` (within ``convert``),
        ``convert``, ``total``.

    Raises:
        MethodUnavailable: FireANTs is not installed.
    """
    fa = import_fireants()
    if algorithm not in ("greedy", "syn"):
        raise ValueError(f"algorithm must be 'greedy' or 'syn', not {algorithm!r}")
    if inverse and algorithm == "syn":
        raise ValueError("FireANTs gives no inverse for SyN (SyNRegistration.get_inverse_warp_parameters raises)")
    torch.manual_seed(int(seed))
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        with warnings.catch_warnings():  # its logger.warn(...) calls: DeprecationWarning
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fireants(\.|$)")
            return _register(fa, fixed, moving, algorithm=algorithm, spacing=spacing, moments=moments,
                             affine=affine, affine_opts=affine_opts, deformable_opts=deformable_opts,
                             iterations=iterations, affine_iterations=affine_iterations, inverse=inverse,
                             transform_dir=transform_dir, keep_warped=keep_warped)
    finally:
        torch.set_num_threads(threads_before)


def _register(fa: dict[str, Any], fixed: Volume, moving: Volume, *, algorithm: str,
              spacing: float | None, moments: int | None, affine: bool, affine_opts: dict[str, Any] | None,
              deformable_opts: dict[str, Any] | None, iterations: Sequence[int] | None,
              affine_iterations: Sequence[int] | None, inverse: bool, transform_dir: str | None,
              keep_warped: bool) -> FieldResult:
    aff_kw = _stage(LPBA40_AFFINE, {**(affine_opts or {}),
                                    **({"iterations": affine_iterations} if affine_iterations else {})})
    base = LPBA40_GREEDY if algorithm == "greedy" else LPBA40_SYN
    def_kw = _stage(base, {**(deformable_opts or {}), **({"iterations": iterations} if iterations else {})})

    t0 = time.perf_counter()
    fw, mw = working_inputs(fixed, moving, spacing)
    timings: dict[str, float] = {"prepare": time.perf_counter() - t0}
    info: dict[str, Any] = {"algorithm": algorithm, "moments": moments, "affine_opts": aff_kw if affine else None,
                            "deformable_opts": def_kw, "device": "cpu", "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="avsm-fireants-") as tmp:
        out_dir = transform_dir or tmp
        os.makedirs(out_dir, exist_ok=True)
        fpath, mpath = os.path.join(tmp, "fixed.mha"), os.path.join(tmp, "moving.mha")  # exact geometry
        import SimpleITK as sitk  # noqa: PLC0415

        sitk.WriteImage(sitk.Cast(fw.to_sitk(), sitk.sitkFloat32), fpath)
        sitk.WriteImage(sitk.Cast(mw.to_sitk(), sitk.sitkFloat32), mpath)
        F = fa["BatchedImages"]([fa["Image"].load_file(fpath, device="cpu")])
        M = fa["BatchedImages"]([fa["Image"].load_file(mpath, device="cpu")])
        timings["prepare"] = time.perf_counter() - t0

        init = None
        t1 = time.perf_counter()
        if moments:
            mom = fa["MomentsRegistration"](1, F, M, moments=int(moments), orientation="rot", progress_bar=False)
            with contextlib.redirect_stdout(io.StringIO()):
                mom.optimize()
            init = mom.get_affine_init().detach()
        timings["moments"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        aff_mat = None
        if affine:
            scales, its = aff_kw.pop("scales"), aff_kw.pop("iterations")
            areg = fa["AffineRegistration"](scales, its, F, M, init_rigid=init, optimizer_params={},
                                            progress_bar=False, **aff_kw)
            areg.optimize()
            aff_mat = areg.get_affine_matrix().detach()
            aff_kw.update(scales=scales, iterations=its)
        elif init is not None:
            aff_mat = torch.cat([init, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=init.dtype)], dim=1)
        timings["affine"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        cls = fa["GreedyRegistration"] if algorithm == "greedy" else fa["SyNRegistration"]
        kw = dict(def_kw)
        scales, its = kw.pop("scales"), kw.pop("iterations")
        reg = cls(scales=scales, iterations=its, fixed_images=F, moving_images=M, init_affine=aff_mat,
                  progress_bar=False, **kw)
        reg.optimize()
        timings["deformable"] = time.perf_counter() - t1
        timings["registration"] = timings["moments"] + timings["affine"] + timings["deformable"]

        t2 = time.perf_counter()
        fwd_path = os.path.join(out_dir, "fwd_0Warp.nii.gz")
        with contextlib.redirect_stderr(io.StringIO()):  # SyN's inversion shows tqdm bars
            reg.save_as_ants_transforms(fwd_path)
        timings["export"] = time.perf_counter() - t2
        fgrid, ffield = read_displacement_field(fwd_path)
        paths = {"forward": fwd_path}
        affine_forward = None
        if aff_mat is not None:
            affine_forward = aff_mat[0].double().cpu().numpy()
            if affine:
                apath = os.path.join(out_dir, "aff_0GenericAffine.mat")
                areg.save_as_ants_transforms(apath)
                paths["affine"] = apath
        inverse_tx = None
        if inverse:
            ipath = os.path.join(out_dir, "inv_0InverseWarp.nii.gz")
            with contextlib.redirect_stderr(io.StringIO()):
                reg.save_as_ants_transforms(ipath, save_inverse=True)
            igrid, ifield = read_displacement_field(ipath)
            inverse_tx = WorldTransform(field_grid=igrid, field=ifield)
            paths["inverse"] = ipath
        if transform_dir:
            info["ants_transforms"] = paths
        if keep_warped:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                moved = reg.evaluate(F, M)
            arr = moved.detach().cpu().numpy()[0, 0].astype(np.float32)  # (z, y, x) like Volume.array
            info["tool_warped"] = Volume(np.ascontiguousarray(arr), fw.grid)
            info["fixed_work"], info["moving_work"] = fw, mw
        timings["convert"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return FieldResult(
        fixed_original=fixed.grid, moving_original=moving.grid,
        forward=WorldTransform(field_grid=fgrid, field=ffield), inverse=inverse_tx,
        affine_forward=affine_forward, method="fireants" if algorithm == "greedy" else "fireants-syn",
        timings=timings, info=info,
    )


def fireants(fixed: Volume, moving: Volume, **opts: Any) -> FieldResult:
    """FireANTs on the CPU: centre-of-mass moments, the LPBA40 script's affine and greedy stages (module docstring)."""
    return fireants_register(fixed, moving, **opts)
