"""One interface for every registration method: avsm's own and the peer baselines.

A *method* is a callable ``(fixed: Volume, moving: Volume, **opts) -> result``
registered under a name in :data:`REGISTRY`.  Every result exposes what the
metrics need, in world coordinates (LPS, mm), with avsm's pull-back convention
(fixed-space point → moving-space point, see :mod:`avsm.core.coords`):

* ``world_map(grid=None, *, inverse=False, affine_only=False)`` →
  ``(1, 3, *grid.shape)`` float64;
* ``warp(volume, *, onto=None, inverse=False, mode=None, affine_only=False)`` → :class:`Volume`;
* ``jacobian_determinant(grid=None)`` → ``grid.shape`` float64 physical det J;
* ``fixed_original`` / ``moving_original`` grids, ``method``, ``timings`` and ``info``.

:class:`avsm.api.RegistrationResult` already has this interface; the baselines
return :class:`FieldResult`, built from a world affine and/or a dense world
displacement field, which is how ANTs, SimpleITK, NiftyReg and elastix express
their transforms.  So every metric is computed by the same code for every method.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from avsm.core.sampling import warp as warp_tensor
from avsm.io.geometry import Grid
from avsm.io.image import Volume
from avsm.transform import WorldMapTransform, apply_homogeneous, grid_world_points

__all__ = [
    "ResultLike",
    "WorldTransform",
    "FieldResult",
    "REGISTRY",
    "register_method",
    "get_method",
    "available_methods",
    "working_inputs",
    "MethodUnavailable",
    "run_tool",
    "tool_threads",
]

log = logging.getLogger(__name__)


class MethodUnavailable(RuntimeError):
    """A method's optional package (or pretrained model) is not available here."""


class ResultLike(Protocol):
    """What every method returns (see the module docstring)."""

    fixed_original: Grid
    moving_original: Grid
    method: str
    timings: dict[str, float]

    def world_map(self, grid: Grid | None = None, *, inverse: bool = False,
                  affine_only: bool = False) -> torch.Tensor: ...

    def warp(self, volume: Volume, *, onto: Grid | None = None, inverse: bool = False,
             mode: str | None = None, affine_only: bool = False) -> Volume: ...

    def jacobian_determinant(self, grid: Grid | None = None) -> np.ndarray: ...


@dataclass
class WorldTransform:
    """A pull-back transform in world coordinates: ``x -> affine @ (x + field(x))``.

    Attributes:
        affine: ``(4, 4)`` float64 homogeneous world matrix (LPS mm → LPS mm).
        field_grid: grid on which ``field`` is sampled (``None`` without field).
        field: ``(3, *field_grid.shape)`` float64 world displacement (LPS, mm),
            channel order x, y, z (ITK's displacement-field convention), or
            ``None`` for a pure affine.  Between and beyond samples it is
            interpolated trilinearly and held constant outside the grid.
    """

    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    field_grid: Grid | None = None
    field: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")
        if self.field is not None:
            if self.field_grid is None:
                raise ValueError("a displacement field needs its grid")
            if self.field.shape != (3, *self.field_grid.shape):
                raise ValueError(f"field shape {self.field.shape} does not match grid {self.field_grid.shape}")

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``(1, 3, ...)`` (mm) to world points (mm), float64."""
        pts = points.double()
        if self.field is not None:
            assert self.field_grid is not None
            spatial = pts.shape[2:]
            u = apply_homogeneous(self.field_grid.world_to_unit(), pts.reshape(1, 3, -1)).reshape(1, 3, -1, 1, 1)
            f = torch.from_numpy(np.ascontiguousarray(self.field, dtype=np.float64))[None]
            d = warp_tensor(f, u, mode="linear", padding="border").reshape(1, 3, *spatial)
            pts = pts + d
        return apply_homogeneous(self.affine, pts)


@dataclass
class FieldResult(WorldMapTransform):
    """A registration result given by world transforms (what baselines return).

    Attributes:
        fixed_original, moving_original: the two images' own grids.
        forward: fixed-world → moving-world pull-back transform.
        inverse: moving-world → fixed-world transform, or ``None`` when the tool
            gives none (then ``inverse=True`` raises).
        affine_forward: ``(4, 4)`` world matrix of the affine stage alone, or ``None``.
        method, timings (seconds per stage, with ``total``), info (extra records).
    """

    fixed_original: Grid
    moving_original: Grid
    forward: WorldTransform
    inverse: WorldTransform | None = None
    affine_forward: np.ndarray | None = None
    method: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def world_map(self, grid: Grid | None = None, *, inverse: bool = False,
                  affine_only: bool = False) -> torch.Tensor:
        """World point each voxel of ``grid`` maps to, ``(1, 3, *grid.shape)`` float64.

        Forward: ``grid`` lies in the fixed image's world (default its own grid)
        and values are moving-world points; ``inverse`` swaps the roles.
        """
        if grid is None:
            grid = self.moving_original if inverse else self.fixed_original
        pts = grid_world_points(grid)
        if inverse:
            if affine_only:
                if self.affine_forward is None:
                    raise NotImplementedError(f"{self.method}: no affine stage recorded")
                return apply_homogeneous(np.linalg.inv(self.affine_forward), pts)
            if self.inverse is None:
                raise NotImplementedError(f"{self.method}: the tool gives no inverse transform")
            return self.inverse(pts)
        if affine_only:
            if self.affine_forward is None:
                raise NotImplementedError(f"{self.method}: no affine stage recorded")
            return apply_homogeneous(self.affine_forward, pts)
        return self.forward(pts)

    def folds(self) -> int:
        """Voxels with det J < 0 on the fixed image's own grid."""
        return int((self.jacobian_determinant() < 0).sum())


# --------------------------------------------------------------------------- inputs


def working_inputs(fixed: Volume, moving: Volume, spacing: float | None = 2.0) -> tuple[Volume, Volume]:
    """The pair as avsm's registration sees it: canonical working grids (≈ ``spacing`` mm),
    intensities normalised to [0, 1] (0.1/99.9 percentiles for MR, the Hounsfield window for CT,
    as :func:`avsm.api.resolve_modalities` decides) after an anti-aliasing blur.

    Baselines run on these, so every method gets the same input data.

    Returns:
        ``(fixed_w, moving_w)`` float32 volumes.
    """
    from avsm.api import detect_modality, to_working, working_grid_for

    fmod, mmod = detect_modality(fixed), detect_modality(moving)
    fg = working_grid_for(fixed.grid, spacing=spacing, keep_thick_slices=fmod == "ct")
    mg = working_grid_for(moving.grid, spacing=spacing, keep_thick_slices=mmod == "ct")
    return (Volume(to_working(fixed, fg, fmod), fg, fixed.path), Volume(to_working(moving, mg, mmod), mg, moving.path))


# --------------------------------------------------------------------------- registry

Method = Callable[..., Any]

#: name -> "module:function" (imported lazily, so optional packages stay optional)
REGISTRY: dict[str, str | Method] = {
    "identity": "avsm.baselines.avsm_methods:identity",
    "affine": "avsm.baselines.avsm_methods:affine",
    "opt": "avsm.baselines.avsm_methods:opt",
    "opt-paper": "avsm.baselines.avsm_methods:opt_paper",
    "net": "avsm.baselines.avsm_methods:net",
    "net+opt": "avsm.baselines.avsm_methods:net_opt",
    "ants-syn": "avsm.baselines.ants:ants_syn",
    "ants-syncc": "avsm.baselines.ants:ants_syncc",
    "ants-syn-cc": "avsm.baselines.ants:ants_syn_cc",
    "ants-syn-quick": "avsm.baselines.ants:ants_syn_quick",
    "fireants": "avsm.baselines.fireants:fireants",
    "demons": "avsm.baselines.demons:demons",
    "sitk-affine": "avsm.baselines.demons:sitk_affine",
    "niftyreg": "avsm.baselines.niftyreg:niftyreg",
    "elastix": "avsm.baselines.elastix:elastix",
    "voxelmorph": "avsm.baselines.voxelmorph:voxelmorph",
}


def register_method(name: str, fn: Method | str) -> None:
    """Add (or replace) a method: a callable or a ``"module:function"`` string."""
    REGISTRY[name] = fn


def get_method(name: str) -> Method:
    """The callable of a method name.

    Names ``net-s<k>`` (``k`` = 1, 2, ...) select the network with ``k`` vSVF
    test-time steps, and ``net-a<j>-s<k>`` also sets ``j`` affine steps.  A name
    ``<method>@<tag>`` is ``<method>`` under another name (so that one run can compare,
    e.g., two network weights files given by ``EvalConfig.method_opts["net@old"]``).

    Raises:
        KeyError: unknown name.
        MethodUnavailable: its optional package is missing.
    """
    import functools
    import re

    if "@" in name and name not in REGISTRY:
        return get_method(name.split("@", 1)[0])
    m = re.fullmatch(r"net(?:-a(\d+))?-s(\d+)", name)
    if m and name not in REGISTRY:
        base = get_method("net")
        kw: dict[str, int] = {"vsvf_steps": int(m.group(2))}
        if m.group(1):
            kw["affine_steps"] = int(m.group(1))
        return functools.partial(base, **kw)
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    target = REGISTRY[name]
    if callable(target):
        return target
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise MethodUnavailable(f"{name}: optional package missing ({e})") from e
    return getattr(mod, fn_name)


def available_methods() -> list[str]:
    """Registered names whose module imports here (the network may still fail to load)."""
    out = []
    for name in REGISTRY:
        try:
            get_method(name)
        except MethodUnavailable:
            continue
        out.append(name)
    return out


def tool_threads(threads: int | None = None) -> int:
    """Threads for a peer tool: ``threads``, else ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, else 2."""
    import os

    return int(threads if threads is not None else os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2"))


def run_tool(args: list[str], cwd: str) -> None:
    """Run an external registration tool; on failure raise with the tool's last output lines.

    Raises:
        RuntimeError: non-zero exit status (message: tool name, status, last 5 lines of stderr/stdout).
    """
    import subprocess
    from pathlib import Path

    log.debug("running %s", " ".join(args))
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {proc.returncode}): {' | '.join(tail)}")


def run_method(name: str, fixed: Volume, moving: Volume, **opts: Any) -> Any:
    """Run a method by name and make sure ``timings['total']`` holds its wall time (s)."""
    fn = get_method(name)
    t0 = time.perf_counter()
    res = fn(fixed, moving, **opts)
    total = time.perf_counter() - t0
    res.timings = dict(getattr(res, "timings", {}) or {})
    res.timings.setdefault("total", total)
    res.timings["wall"] = total
    return res
