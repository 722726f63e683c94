"""vSVF-opt: multi-scale L-BFGS optimisation of a vSVF momentum per image pair.

The momentum is an ``nn.Parameter`` on the low-resolution grid of each
pyramid level; the physics is :class:`avsm.models.vsvf.VSVF`, the same code
the AVSM network uses.  The initial map is the affine map (or any map given),
and the momentum is upsampled between levels.  Energy:
``sim(moving ∘ Φ, fixed) + λ_vr ⟨m, v⟩``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from avsm.core.sampling import resample_image, resample_map, warp
from avsm.core.smoothing import DEFAULT_SIGMAS
from avsm.losses.similarity import similarity
from avsm.models.vsvf import VSVF, low_res_shape
from avsm.optim.affine_opt import scaled_shape

log = logging.getLogger(__name__)


@dataclass
class VSVFOptConfig:
    """Settings of vSVF-opt (paper defaults: λ_vr = 10, 10 RK4 steps, 60 L-BFGS iterations per scale)."""

    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    iterations: tuple[int, ...] = (60, 60, 60)
    reg_weight: float = 10.0
    time_steps: int = 10
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    similarity: str = "lncc"
    low_res_factor: float = 0.5
    lbfgs_history: int = 5
    lbfgs_lr: float = 1.0
    min_size: int = 16
    history: list[dict] = field(default_factory=list)


@dataclass
class VSVFOptResult:
    """Result of vSVF-opt on the finest level.

    Attributes:
        phi: ``(1, 3, D, H, W)`` forward map (fixed grid → moving unit coordinates).
        momentum: ``(1, 3, d, h, w)`` optimised low-resolution momentum.
        velocity: ``(1, 3, d, h, w)`` its velocity.
        model: the :class:`VSVF` of the finest level (for inverses).
    """

    phi: torch.Tensor
    momentum: torch.Tensor
    velocity: torch.Tensor
    model: VSVF


def optimise_vsvf(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    phi0: torch.Tensor,
    config: VSVFOptConfig | None = None,
    *,
    progress: bool = True,
) -> VSVFOptResult:
    """Optimise the momentum of one vSVF step starting from ``phi0``.

    Args:
        fixed: ``(1, 1, D, H, W)`` in [0, 1].
        moving: ``(1, 1, d, h, w)`` in [0, 1], its own grid.
        phi0: ``(1, 3, D, H, W)`` initial map (e.g. the affine map), fixed → moving unit coordinates.
        config: settings.
        progress: show a tqdm bar.
    """
    cfg = config or VSVFOptConfig()
    if len(cfg.scales) != len(cfg.iterations):
        raise ValueError("one iteration count per scale is needed")
    sim = similarity(cfg.similarity)
    m_prev: torch.Tensor | None = None
    bar = tqdm(total=sum(cfg.iterations), desc="vsvf-opt", disable=not progress, leave=False)
    model: VSVF | None = None
    for scale, iters in zip(cfg.scales, cfg.iterations):
        fs = scaled_shape(fixed.shape[2:], scale, cfg.min_size)
        ms = scaled_shape(moving.shape[2:], scale, cfg.min_size)
        f = resample_image(fixed, fs)
        mv = resample_image(moving, ms)
        p0 = resample_map(phi0, fs)
        model = VSVF(fs, low_res_shape(fs, cfg.low_res_factor), sigmas=cfg.sigmas,
                     steps=cfg.time_steps).to(fixed.device)
        if m_prev is None:
            init = torch.zeros(1, 3, *model.low_shape, dtype=fixed.dtype, device=fixed.device)
        else:
            init = F.interpolate(m_prev, size=model.low_shape, mode="trilinear", align_corners=True)
        m = torch.nn.Parameter(init)
        opt = torch.optim.LBFGS([m], lr=cfg.lbfgs_lr, max_iter=1, history_size=cfg.lbfgs_history,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                tolerance_change=0.0)
        state: dict[str, float] = {}

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            step = model(m, p0)
            s = sim(warp(mv, step.phi), f)
            r = step.energy.mean()
            loss = s + cfg.reg_weight * r
            loss.backward()
            state.update(sim=s.item(), reg=r.item(), loss=loss.item())
            return loss

        for it in range(iters):
            opt.step(closure)
            bar.update(1)
            if it % 10 == 0 or it == iters - 1:
                log.debug("vsvf-opt scale %.2f it %d loss %.5f sim %.5f reg %.5f", scale, it,
                          state.get("loss", float("nan")), state.get("sim", float("nan")),
                          state.get("reg", float("nan")))
                cfg.history.append({"stage": "vsvf", "scale": scale, "iter": it, **state})
        m_prev = m.detach()
    bar.close()
    assert model is not None and m_prev is not None
    with torch.no_grad():
        step = model(m_prev, resample_map(phi0, model.full_shape))
    return VSVFOptResult(phi=step.phi, momentum=m_prev, velocity=step.v, model=model)
