"""vSVF-opt: multi-scale optimisation of a vSVF momentum per image pair.

The momentum is an ``nn.Parameter`` on the low-resolution grid of each
pyramid level; the physics is :class:`avsm.models.vsvf.VSVF`, the same code
the AVSM network uses.  The initial map is the affine map (or any map given),
and the momentum is upsampled between levels.  Energy:
``sim(moving ∘ Φ, fixed) + λ_vr ⟨m, v⟩``.

Optimisers (``VSVFOptConfig.optimizer``), measured in
``benchmarks/profile_opt.py`` and ``benchmarks/bench_opt_schedules.py``:

* ``lbfgs``: L-BFGS with a strong-Wolfe line search (the paper's; about 2.3
  energy evaluations per iteration);
* ``lbfgs-nols``: L-BFGS with a fixed step and no line search (one evaluation
  per iteration);
* ``adam``: Adam with a fixed learning rate per level (one evaluation per
  iteration; what FireANTs uses).

Each level may stop early when the energy has not decreased by more than
``tol`` (relative) over the last ``window`` iterations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from avsm.core.sampling import Pyramid, level, resample_map, warp_masked
from avsm.core.smoothing import DEFAULT_SIGMAS
from avsm.losses.lncc import MKLNCC, Window
from avsm.losses.similarity import similarity as similarity_loss
from avsm.models.vsvf import INTEGRATORS, VSVF, low_res_shape
from avsm.optim.affine_opt import scaled_shape
from avsm.optim.optimizers import LBFGS, Adam
from avsm.optim.stopping import RelativeChangeStop

log = logging.getLogger(__name__)

#: optimisers of the momentum
OPTIMIZERS = ("lbfgs", "lbfgs-nols", "adam")


@dataclass
class VSVFOptConfig:
    """Settings of vSVF-opt (defaults: the paper's, λ_vr = 10, RK4 10 steps, 60 L-BFGS iterations per scale).

    Attributes:
        scales: pyramid levels, coarse to fine, as fractions of the working grid.
        iterations: maximum iterations per level.
        reg_weight: λ_vr of the regulariser ``⟨m, v⟩``.
        integrator: ``rk4``/``euler`` (transport equation, ``time_steps`` steps) or ``ss``
            (scaling and squaring, ``squarings`` compositions).
        sigmas: multi-Gaussian kernel σ (unit domain).
        similarity: similarity name (see :func:`avsm.losses.similarity.similarity`).
        lncc_windows: mk-LNCC window sizes in voxels of each level (equal weights, dense
            windows); empty: the paper's windows, sized from the image (S/4 and S/2 at 2 mm).
        low_res_factor: momentum grid relative to each level's image grid.
        optimizer: ``lbfgs``, ``lbfgs-nols`` or ``adam``.
        lr: step of the optimiser (L-BFGS step length, or Adam learning rate in momentum units).
        lbfgs_history: L-BFGS memory.
        tol: relative energy decrease over ``window`` iterations below which a level stops (0: never).
        window: iterations over which ``tol`` is measured.
        min_size: smallest pyramid side (voxels).
    """

    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    iterations: tuple[int, ...] = (60, 60, 60)
    reg_weight: float = 10.0
    integrator: str = "rk4"
    time_steps: int = 10
    squarings: int = 7
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    similarity: str = "lncc"
    lncc_windows: tuple[int, ...] = ()
    low_res_factor: float = 0.5
    optimizer: str = "lbfgs"
    lr: float = 1.0
    lbfgs_history: int = 5
    tol: float = 0.0
    window: int = 5
    min_size: int = 16

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        self.iterations = tuple(int(i) for i in self.iterations)
        self.sigmas = tuple(float(s) for s in self.sigmas)
        self.lncc_windows = tuple(int(k) for k in self.lncc_windows)
        if any(k < 2 for k in self.lncc_windows):
            raise ValueError("mk-LNCC windows must be >= 2 voxels")
        if len(self.scales) != len(self.iterations) or not self.scales:
            raise ValueError("one iteration count per scale is needed")
        if any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must lie in (0, 1], got {self.scales}")
        if any(i < 0 for i in self.iterations):
            raise ValueError("iterations must be >= 0")
        if self.integrator not in INTEGRATORS:
            raise ValueError(f"unknown integrator {self.integrator!r}; choose one of {', '.join(INTEGRATORS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or self.reg_weight < 0 or self.tol < 0 or self.window < 1:
            raise ValueError("lr must be > 0, reg_weight and tol >= 0, window >= 1")


@dataclass
class VSVFOptResult:
    """Result of vSVF-opt on the finest level.

    Attributes:
        phi: ``(1, 3, D, H, W)`` forward map (fixed grid → moving unit coordinates).
        momentum: ``(1, 3, d, h, w)`` optimised low-resolution momentum.
        velocity: ``(1, 3, d, h, w)`` its velocity.
        model: the :class:`VSVF` of the finest level (for inverses).
        history: per-iteration records (level, iteration, energy terms).
        evaluations: energy evaluations per level.
        level_seconds: wall time per level (s).
    """

    phi: torch.Tensor
    momentum: torch.Tensor
    velocity: torch.Tensor
    model: VSVF
    history: list[dict] = field(default_factory=list)
    evaluations: list[int] = field(default_factory=list)
    level_seconds: list[float] = field(default_factory=list)


def build_similarity(name: str, lncc_windows: Sequence[int] = ()) -> torch.nn.Module:
    """The similarity loss of a config: by name, with mk-LNCC windows of the given sizes (voxels)."""
    if name == "lncc" and lncc_windows:
        n = len(lncc_windows)
        # dense small windows: box sums by cumulative sums (about 10x faster than the strided
        # conv at stride 1 on a 128x128x80 grid, forward and backward; benchmarks/profile_opt.py)
        return MKLNCC(windows=[Window(size=int(k), weight=1.0 / n, dilation=1, stride=max(1, int(k) // 4))
                               for k in lncc_windows], box="cumsum")
    return similarity_loss(name)


def _make_optimizer(cfg: VSVFOptConfig, m: torch.nn.Parameter) -> Adam | LBFGS | torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return Adam([m], lr=cfg.lr)
    if cfg.optimizer == "lbfgs-nols":
        return LBFGS([m], lr=cfg.lr, history_size=cfg.lbfgs_history)
    return torch.optim.LBFGS([m], lr=cfg.lr, max_iter=1, history_size=cfg.lbfgs_history,
                             line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)


def optimise_vsvf(
    fixed: torch.Tensor | Pyramid,
    moving: torch.Tensor | Pyramid,
    phi0: torch.Tensor,
    config: VSVFOptConfig | None = None,
    *,
    weight: torch.Tensor | Pyramid | None = None,
    moving_weight: torch.Tensor | Pyramid | None = None,
    progress: bool = True,
) -> VSVFOptResult:
    """Optimise the momentum of one vSVF step starting from ``phi0``.

    Args:
        fixed: ``(1, 1, D, H, W)`` in [0, 1].
        moving: ``(1, 1, d, h, w)`` in [0, 1], its own grid.
        phi0: ``(1, 3, D, H, W)`` initial map (e.g. the affine map), fixed → moving unit coordinates.
        config: settings.
        weight: optional ``(1, 1, D, H, W)`` similarity weight in [0, 1] on the fixed grid (a mask).
        moving_weight: optional ``(1, 1, d, h, w)`` mask on the moving grid; warped with the
            image at every evaluation, so only points that land inside it count.
        progress: show a tqdm bar.
    """
    cfg = config or VSVFOptConfig()
    sim = build_similarity(cfg.similarity, cfg.lncc_windows)
    m_prev: torch.Tensor | None = None
    bar = tqdm(total=sum(cfg.iterations), desc="vsvf-opt", disable=not progress, leave=False)
    model: VSVF | None = None
    history: list[dict] = []
    evaluations: list[int] = []
    level_seconds: list[float] = []
    for scale, iters in zip(cfg.scales, cfg.iterations):
        t_level = time.perf_counter()
        fs = scaled_shape(fixed.shape[2:], scale, cfg.min_size)
        ms = scaled_shape(moving.shape[2:], scale, cfg.min_size)
        f = level(fixed, fs)
        mv = level(moving, ms)
        w = level(weight, fs)
        mw = level(moving_weight, ms)
        p0 = resample_map(phi0, fs)
        model = VSVF(fs, low_res_shape(fs, cfg.low_res_factor), sigmas=cfg.sigmas, steps=cfg.time_steps,
                     method=cfg.integrator, squarings=cfg.squarings).to(f.device)
        if m_prev is None:
            init = torch.zeros(1, 3, *model.low_shape, dtype=f.dtype, device=f.device)
        else:
            init = F.interpolate(m_prev, size=model.low_shape, mode="trilinear", align_corners=True)
        m = torch.nn.Parameter(init)
        if iters == 0:
            m_prev = m.detach()
            evaluations.append(0)
            level_seconds.append(time.perf_counter() - t_level)
            continue
        opt = _make_optimizer(cfg, m)
        state: dict[str, float] = {}
        count = [0]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            step = model(m, p0)
            wp, wt = warp_masked(mv, mw, step.phi, w)
            s = sim(wp, f) if wt is None else sim(wp, f, weight=wt)
            r = step.energy.mean()
            loss = s + cfg.reg_weight * r
            loss.backward()
            count[0] += 1
            state.update(sim=s.item(), reg=r.item(), loss=loss.item())
            return loss

        stop = RelativeChangeStop(cfg.tol, cfg.window)
        for it in range(iters):
            if cfg.optimizer == "adam":
                closure()
                opt.step()
            else:
                opt.step(closure)
            bar.update(1)
            loss = state.get("loss", math.nan)
            if not math.isfinite(loss):
                raise FloatingPointError(f"vSVF-opt energy is {loss} at scale {scale}, iteration {it}")
            history.append({"stage": "vsvf", "scale": scale, "iter": it, **state})
            if stop.update(loss):
                log.debug("vsvf-opt scale %.2f stopped at iteration %d (relative change < %g)", scale, it, cfg.tol)
                bar.update(iters - it - 1)
                break
        evaluations.append(count[0])
        level_seconds.append(time.perf_counter() - t_level)
        log.debug("vsvf-opt scale %.2f: %d iterations, %d evaluations, loss %.5f", scale, it + 1, count[0],
                  state.get("loss", math.nan))
        m_prev = m.detach()
    bar.close()
    assert model is not None and m_prev is not None
    with torch.no_grad():
        step = model(m_prev, resample_map(phi0, model.full_shape))
    return VSVFOptResult(phi=step.phi, momentum=m_prev, velocity=step.v, model=model, history=history,
                         evaluations=evaluations, level_seconds=level_seconds)

