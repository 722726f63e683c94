"""Python API: register two images, warp images and labels, get maps in world space.

This module is the bridge between world geometry (:mod:`avsm.io`) and the
unit-cube core (:mod:`avsm.core`).  A registration runs on *working grids*:
each image's own physical box, re-indexed to a canonical orientation
(tensor axes ≈ S-I, A-P, L-R) and resampled to about 2 mm (sizes a multiple
of 16).  The map starts from the **physical identity** (the affine that takes
fixed unit coordinates to moving unit coordinates through the world), so
images in different orientations, spacings and positions start aligned as
their headers say.  Results are returned on the **fixed image's own grid**.

Example::

    import avsm
    fixed = avsm.load_image("fixed.nii.gz")
    moving = avsm.load_image("moving.nii.gz")
    result = avsm.register(fixed=fixed, moving=moving, method="opt")
    warped = result.warp(moving)                      # on fixed's grid
    labels = result.warp(avsm.load_image("seg.nii.gz", label=True))
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avsm.core.coords import affine_map, homogeneous_to_centred, invert_affine
from avsm.core.sampling import Pyramid
from avsm.io.geometry import Grid, unit_affine_between
from avsm.io.image import Volume, resample
from avsm.io.working import (  # noqa: F401 - re-exported: avsm.api is where users look
    CT_WINDOW,
    detect_modality,
    normalise_ct,
    to_working,
    working_grid_for,
)
from avsm.models.domain import check_input
from avsm.models.vsvf import VSVF, VelocityStep, replay
from avsm.optim.affine_opt import optimise_affine
from avsm.optim.initialise import initial_affine
from avsm.optim.vsvf_opt import VSVFOptConfig, optimise_vsvf
from avsm.settings import DEFAULT_PRESET, INIT_MODES, NATIVE_FLOOR_MM, RegistrationSettings, at_spacing, preset
from avsm.transform import RegistrationResult

log = logging.getLogger(__name__)


@dataclass
class PreparedPair:
    """A pair ready for the core: normalised tensors on canonical working grids.

    Attributes:
        fixed, moving: the original volumes.
        fixed_grid, moving_grid: working grids (same boxes, canonical axes).
        fixed_t, moving_t: ``(1, 1, D, H, W)`` float32 intensities in [0, 1].
        A0, b0: ``(1, 3, 3)``, ``(1, 3)`` physical-identity centred affine,
            fixed working unit → moving working unit coordinates.
    """

    fixed: Volume
    moving: Volume
    fixed_grid: Grid
    moving_grid: Grid
    fixed_t: torch.Tensor
    moving_t: torch.Tensor
    A0: torch.Tensor
    b0: torch.Tensor


def prepare_pair(
    fixed: Volume,
    moving: Volume,
    *,
    spacing: float | None = 2.0,
    shape: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    modalities: tuple[str, str] = ("mr", "mr"),
    ct_window: tuple[float, float] = CT_WINDOW,
) -> PreparedPair:
    """Working grids, normalised tensors and the physical-identity initial affine.

    ``modalities`` (fixed, moving): ``ct`` images are windowed in Hounsfield units and
    keep their thick-slice spacing on the working grid; ``mr`` images use percentiles.
    """
    fg = working_grid_for(fixed.grid, spacing=spacing, shape=shape, keep_thick_slices=modalities[0] == "ct")
    mg = working_grid_for(moving.grid, spacing=spacing, shape=shape, keep_thick_slices=modalities[1] == "ct")
    ft = torch.from_numpy(to_working(fixed, fg, modalities[0], ct_window))[None, None].to(device)
    mt = torch.from_numpy(to_working(moving, mg, modalities[1], ct_window))[None, None].to(device)
    M = torch.as_tensor(unit_affine_between(fg, mg), dtype=torch.float64).unsqueeze(0)
    A0, b0 = homogeneous_to_centred(M)
    return PreparedPair(fixed, moving, fg, mg, ft, mt, A0.float().to(device), b0.float().to(device))


def _load_net(model: Any, device: torch.device | str) -> Any:
    from avsm.models.pretrained import (
        load_pretrained,  # local: networks only when asked
    )

    if model is None or isinstance(model, str):
        return load_pretrained(model, device=device)
    return model.to(device)


#: legacy keyword names of :func:`register` and where they go in the settings
_LEGACY = {"affine_config": "affine", "vsvf_config": "vsvf"}
_NETWORK_KEYS = ("affine_steps", "vsvf_steps")


def resolve_settings(settings: RegistrationSettings | None = None, **overrides: Any) -> RegistrationSettings:
    """The settings of a call: ``settings`` (default: the ``native`` preset, :data:`avsm.settings.DEFAULT_PRESET`) with keyword overrides.

    Overrides are fields of :class:`RegistrationSettings`, plus ``affine_config`` /
    ``vsvf_config`` (stage configs; for ``net+opt`` the latter is the refinement),
    ``affine_steps`` / ``vsvf_steps`` / ``network_affine`` (network) and ``refine_iterations``.
    """
    s = settings or preset(DEFAULT_PRESET)
    changes: dict[str, Any] = {}
    net_changes: dict[str, Any] = {}
    refine_iterations = overrides.pop("refine_iterations", None)
    for k, v in overrides.items():
        if v is None:
            continue
        if k in _NETWORK_KEYS:
            net_changes[k] = v
        elif k == "network_affine":
            net_changes["affine"] = v
        elif k in _LEGACY:
            changes[_LEGACY[k]] = v
        else:
            changes[k] = v
    method = changes.get("method", s.method)
    if "affine" in changes and (method == "affine" or changes.get("transform", s.transform) != "deformable"):
        changes["linear"] = changes["affine"]  # the affine config of a linear-only registration
    if method == "net+opt" and "vsvf" in changes:
        changes["refine"] = changes.pop("vsvf")
    if refine_iterations is not None:
        changes["refine"] = VSVFOptConfig(**{**dataclasses.asdict(changes.get("refine", s.refine)),
                                             "scales": (1.0,), "iterations": (int(refine_iterations),)})
    if net_changes:
        changes["network"] = dataclasses.replace(s.network, **net_changes)
    return s.replace(**changes) if changes else s


def choose_method(fixed: Volume, moving: Volume, settings: RegistrationSettings,
                  modalities: tuple[str, str] | None = None) -> tuple[str, str]:
    """What ``method='auto'`` runs: the most accurate method within ANTs SyN's time for this input.

    Measured (README, ``benchmarks/bench_cohort.py``, 22 real cross-subject pairs, one run):
    ``opt`` (``fast`` preset) 0.574 mean Dice in 0.53× SyN's time (SyN 0.574); ``net+opt``
    0.557 in 0.33×, ahead only on Colin27 ↔ MNI 2009c (0.681 vs 0.674), behind on OASIS-TRT-20
    (0.502 vs 0.512) and on held-out IXI whole heads (0.542 vs 0.599) and brains (0.587 vs
    0.602); ``net`` 0.455.  So ``opt`` for every input; the choice is logged.

    Args:
        modalities: ``(fixed, moving)`` as :func:`resolve_modalities` gives them (unused: the
            choice no longer depends on them; kept for the call signature).

    Returns:
        ``(method, reason)``.
    """
    if settings.transform != "deformable":
        return "opt", f"--transform {settings.transform}"
    return "opt", ("the most accurate method within ANTs SyN's time on real cross-subject brains "
                   "(README, bench_cohort.py); net+opt is faster but less accurate there")


def resolve_modalities(fixed: Volume, moving: Volume, modality: str) -> tuple[str, str]:
    """``(fixed, moving)`` modalities: ``auto`` detects each image (and logs the decision)."""
    if modality != "auto":
        return modality, modality
    out = (detect_modality(fixed), detect_modality(moving))
    for name, v, mod in (("fixed", fixed, out[0]), ("moving", moving, out[1])):
        log.info("modality auto: %s image %s looks like %s", name, v.name, mod.upper())
    return out


def mask_to_working(mask: Volume, grid: Grid, device: torch.device | str) -> torch.Tensor:
    """A 0/1 mask on a working grid as a ``(1, 1, D, H, W)`` float32 weight (trilinear, so in [0, 1])."""
    arr = resample(mask.with_array(mask.array.astype(np.float32), is_label=False), grid,
                   interpolation="linear").array
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))[None, None].to(device)


def initialise(pair: PreparedPair, init: str, similarity: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The initial affine of a pair: ``header`` (the physical identity), ``com``, ``moments``,
    ``auto`` (the best of them by the similarity: mk-LNCC, or mutual information when the
    registration uses ``mi``) or a linear ANTs/ITK transform file.

    Returns:
        ``(A0, b0, record)``: centred affine (fixed → moving working unit coordinates)
        and what was chosen, with every candidate's score.
    """
    if init == "header":
        return pair.A0, pair.b0, {"init": "header", "chosen": "header"}
    world = None
    mode = init
    if init not in INIT_MODES:
        from avsm.export.itk import (
            read_world_affine,  # local: export needs SimpleITK transforms only here
        )

        world = read_world_affine(init)
        mode = "file"
    score = None
    if similarity == "mi":
        from avsm.losses.mi import MutualInformation

        score = MutualInformation()
    res = initial_affine(pair.fixed_t, pair.moving_t, pair.fixed_grid.unit_to_world(),
                         pair.moving_grid.unit_to_world(), mode, world_matrix=world, similarity=score)
    rec = {"init": init, "chosen": res.chosen,
           "scores": {k: (round(v, 5) if np.isfinite(v) else None) for k, v in res.scores.items()}}
    log.info("initialisation %s: chose %s", init, res.chosen)
    return res.A0, res.b0, rec


def domain_warnings(pair: PreparedPair, modalities: tuple[str, str], reference: Any) -> dict[str, list[str]]:
    """Why each image of a pair looks unlike the network's training data; one warning per such image.

    Args:
        pair: the prepared pair (working tensors in [0, 1], as the network sees them).
        modalities: ``(fixed, moving)``.
        reference: the model's :class:`avsm.models.domain.DomainReference`, or ``None``
            (older weights: only the CT and field-of-view checks).

    Returns:
        ``{"fixed": [...], "moving": [...]}``: the reasons (empty lists when fine).
    """
    out: dict[str, list[str]] = {}
    for name, vol, t, mod in (("fixed", pair.fixed, pair.fixed_t, modalities[0]),
                              ("moving", pair.moving, pair.moving_t, modalities[1])):
        reasons = check_input(t, vol.grid.extent_mm, mod, reference)
        out[name] = reasons
        if reasons:
            log.warning("%s image %s looks unlike the network's training data (%s); use --method opt",
                        name, vol.name, "; ".join(reasons))
    return out


def register(
    *,
    fixed: Volume,
    moving: Volume,
    settings: RegistrationSettings | None = None,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    model: Any = None,
    progress: bool = True,
    **overrides: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: intensity volumes (any geometry; see :func:`avsm.io.load_image`).
        settings: all options (:class:`avsm.settings.RegistrationSettings`); default the
            ``native`` preset (:data:`avsm.settings.DEFAULT_PRESET`) with ``method='auto'`` (see
            :func:`choose_method`).
        fixed_mask, moving_mask: 0/1 masks on the images' own grids (see
            :func:`avsm.io.masks.load_mask`); the similarity ignores voxels outside them
            (as ``antsRegistration -x``).  The network ignores masks (its refinement in
            ``net+opt`` uses them).
        model: a loaded :class:`avsm.models.avsm.AVSM` (else ``settings.network.model``
            or the bundled weights).
        progress: tqdm bars.
        **overrides: fields of the settings to change for this call (``method='net'``,
            ``spacing=2.0``, ``device='cuda'`` ...; see :func:`resolve_settings`).

    Returns:
        :class:`RegistrationResult`; ``timings`` holds seconds per stage, ``info`` the
        settings used and the optimisers' histories, and with a network
        ``info["domain_warnings"]`` (see :func:`domain_warnings`).
    """
    s = resolve_settings(settings, **overrides)
    modalities = resolve_modalities(fixed, moving, s.modality)
    if s.method == "auto":
        chosen, why = choose_method(fixed, moving, s, modalities)
        log.info("method auto: %s (%s)", chosen, why)
        s = s.replace(method=chosen)
    method, device = s.method, s.device
    timings: dict[str, float] = {}
    info: dict[str, Any] = {"preset": s.preset, "method": method}
    t0 = time.perf_counter()
    net = None
    net_spacing: float | None = None  # the network's own grid, when it differs from the registration's
    spacing, shape = s.spacing, s.shape
    if method in ("net", "net+opt"):
        net = _load_net(model if model is not None else s.network.model, device)
        net.eval()
        if method == "net+opt" and spacing == "native" and shape is None:
            # the fast start: the network (and --network-affine opt) on its own grid replaces the
            # coarse levels; the refinement runs on the native grid (the same unit cube: the working
            # grids of one image share its box, so A, b and the velocities carry over unchanged)
            net_spacing = float(net.config.working_spacing)
        elif spacing in (None, "native") and shape is None:
            spacing = net.config.working_spacing  # the network works on its own grid
    if spacing == "native" and shape is None:
        spacing = max(NATIVE_FLOOR_MM, min(fixed.grid.spacing))
        log.info("working grid: the fixed image's own spacing, %.3g mm", spacing)
    elif spacing == "native":
        spacing = None  # an explicit shape wins
    if s.preset == "native" and spacing is not None and not isinstance(spacing, str):
        # the native preset's levels are millimetres: a coarser grid (the image's, --spacing, or the
        # network's) keeps them, never finer than itself
        spacing = float(spacing)
        s = s.replace(affine=at_spacing(s.affine, spacing), linear=at_spacing(s.linear, spacing),
                      vsvf=at_spacing(s.vsvf, spacing), refine=at_spacing(s.refine, spacing))
    if spacing is None and shape is None:
        spacing = max(2.0, min(fixed.grid.spacing))  # never upsample a coarse image
    info["modality"] = {"fixed": modalities[0], "moving": modalities[1]}
    pair = prepare_pair(fixed, moving, spacing=spacing, shape=shape, device=device, modalities=modalities,
                        ct_window=s.ct_window)
    # the network's pair: its own grid, or the registration's
    npair = pair if net_spacing is None else prepare_pair(
        fixed, moving, spacing=net_spacing, device=device, modalities=modalities, ct_window=s.ct_window)
    if net is not None:
        info["domain_warnings"] = domain_warnings(npair, modalities, getattr(net, "domain", None))
        if net_spacing is not None:
            info["network_grid"] = list(npair.fixed_grid.shape)
    fw = mask_to_working(fixed_mask, pair.fixed_grid, device) if fixed_mask is not None else None
    mw = mask_to_working(moving_mask, pair.moving_grid, device) if moving_mask is not None else None
    if method == "net" and (fw is not None or mw is not None):
        log.warning("the network does not use masks; they are ignored (use --method opt or net+opt)")
    timings["prepare"] = time.perf_counter() - t0
    t_init = time.perf_counter()
    A0, b0, info["init"] = initialise(npair, s.init, s.similarity)  # unit coordinates: valid on both grids
    timings["init"] = time.perf_counter() - t_init
    # one anti-aliased pyramid per image, shared by the affine and vSVF stages
    f, m = Pyramid(pair.fixed_t), Pyramid(pair.moving_t)
    if fw is not None:
        fw = Pyramid(fw)  # type: ignore[assignment]
    if mw is not None:
        mw = Pyramid(mw)  # type: ignore[assignment]
    t1 = time.perf_counter()
    steps: list[VelocityStep] = []
    if method in ("affine", "opt"):
        history: list[dict] = []
        linear_only = method == "affine" or s.transform != "deformable"
        frames = None
        if s.transform == "rigid":
            frames = tuple(torch.as_tensor(g.unit_to_world()[:3, :3], dtype=torch.float32)
                           for g in (pair.fixed_grid, pair.moving_grid))
        A, b = optimise_affine(f, m, A0, b0, s.linear if linear_only else s.affine, weight=fw,
                               moving_weight=mw, history=history, rigid_frames=frames,  # type: ignore[arg-type]
                               progress=progress)
        info["affine_history"] = history
        timings["affine"] = time.perf_counter() - t1
        if not linear_only:
            t2 = time.perf_counter()
            res = optimise_vsvf(f, m, affine_map(A, b, pair.fixed_grid.shape), s.vsvf, weight=fw,
                                moving_weight=mw, progress=progress)
            timings["vsvf"] = time.perf_counter() - t2
            info["vsvf_history"] = res.history
            info["vsvf_evaluations"] = res.evaluations
            info["vsvf_level_seconds"] = [round(t, 3) for t in res.level_seconds]
            steps.append(res.model.record(res.velocity))
    else:
        assert net is not None
        nf, nm = (f, m) if npair is pair else (Pyramid(npair.fixed_t), Pyramid(npair.moving_t))
        affine_steps = s.network.affine_steps
        if s.network.affine == "opt":
            # affine-opt from the initialisation replaces the affine network (its vSVF steps start
            # there); on the registration's grid at its own levels, so that it is ``opt``'s affine
            # stage (on the network's coarser grid both native levels would collapse onto it)
            history = []
            A0, b0 = optimise_affine(f, m, A0, b0, s.affine, weight=fw, moving_weight=mw,  # type: ignore[arg-type]
                                     history=history, progress=progress)
            info["affine_history"] = history
            timings["affine"] = time.perf_counter() - t1
            affine_steps = 0
        with torch.no_grad():
            out = net(nm.image, nf.image, A0, b0, affine_steps=affine_steps, vsvf_steps=s.network.vsvf_steps)
        A, b = out.A, out.b
        vs: VSVF = net.vsvf_for(npair.fixed_grid.shape)
        steps.extend(vs.record(v) for v in out.velocities)
        timings["network"] = time.perf_counter() - t1 - timings.get("affine", 0.0)
        if method == "net+opt":
            t2 = time.perf_counter()
            phi0 = out.phi
            if npair is not pair:  # the network's map on the registration's grid: the same steps replayed
                with torch.no_grad():
                    phi0 = replay(affine_map(A, b, pair.fixed_grid.shape), steps, pair.fixed_grid.shape)
            res = optimise_vsvf(f, m, phi0, s.refine, weight=fw, moving_weight=mw, progress=progress)
            info["vsvf_history"] = res.history
            info["vsvf_evaluations"] = res.evaluations
            steps.append(res.model.record(res.velocity))
            timings["refine"] = time.perf_counter() - t2
    t_maps = time.perf_counter()
    result = RegistrationResult.from_steps(
        fixed_grid=pair.fixed_grid, moving_grid=pair.moving_grid, fixed_original=fixed.grid,
        moving_original=moving.grid, A=A, b=b, steps=steps, method=method, timings=timings, info=info)
    result.timings["maps"] = time.perf_counter() - t_maps
    result.timings["total"] = time.perf_counter() - t0
    return result


def identity_result(fixed: Volume, moving: Volume, *, spacing: float = 2.0) -> RegistrationResult:
    """The physical-identity 'registration' (no optimisation); a reference for metrics."""
    fg = working_grid_for(fixed.grid, spacing=spacing)
    mg = working_grid_for(moving.grid, spacing=spacing)
    M = torch.as_tensor(unit_affine_between(fg, mg), dtype=torch.float64).unsqueeze(0)
    A, b = homogeneous_to_centred(M)
    Ai, bi = invert_affine(A, b)
    phi = affine_map(A, b, fg.shape).float()
    return RegistrationResult(fg, mg, fixed.grid, moving.grid, A.float(), b.float(), phi,
                              affine_map(Ai, bi, mg.shape).float(), phi, "identity")
