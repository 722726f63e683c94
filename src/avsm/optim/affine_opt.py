"""affine-opt: multi-scale optimisation of a centred affine per image pair.

The 12 parameters ``(A, b)`` (see :mod:`avsm.core.coords`) are optimised with
Adam on a pyramid (scales 0.25, 0.5, 1.0 by default) to minimise a
similarity loss (mk-LNCC by default) between ``moving ∘ T`` and ``fixed``.
Unit coordinates do not depend on the resolution, so the parameters carry
over between scales unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from avsm.core.coords import affine_map
from avsm.core.sampling import resample_image, warp
from avsm.losses.similarity import similarity

log = logging.getLogger(__name__)


@dataclass
class AffineOptConfig:
    """Settings of affine-opt.

    Attributes:
        scales: pyramid levels, coarse to fine, as fractions of the working grid.
        iterations: Adam iterations per level.
        lr: Adam learning rate (parameters are O(1) unit-cube quantities).
        similarity: ``lncc``, ``ncc`` or ``mse``.
    """

    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    iterations: tuple[int, ...] = (200, 200, 50)
    lr: float = 5e-3
    similarity: str = "lncc"
    min_size: int = 16
    history: list[dict] = field(default_factory=list)


def scaled_shape(shape: Sequence[int], scale: float, min_size: int) -> tuple[int, int, int]:
    """``round(scale · N)`` per axis, never below ``min_size`` (nor above N)."""
    return tuple(min(int(n), max(int(round(scale * int(n))), min_size)) for n in shape)  # type: ignore[return-value]


def optimise_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    A0: torch.Tensor,
    b0: torch.Tensor,
    config: AffineOptConfig | None = None,
    *,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise a centred affine from ``(A0, b0)``.

    Args:
        fixed: ``(1, 1, D, H, W)`` fixed image in [0, 1].
        moving: ``(1, 1, d, h, w)`` moving image in [0, 1] (its own grid).
        A0, b0: ``(1, 3, 3)``, ``(1, 3)`` initial transform, fixed → moving unit coordinates.
        config: settings.
        progress: show a tqdm bar.

    Returns:
        Optimised ``(A, b)`` (detached).
    """
    cfg = config or AffineOptConfig()
    if len(cfg.scales) != len(cfg.iterations):
        raise ValueError("one iteration count per scale is needed")
    sim = similarity(cfg.similarity)
    A = A0.detach().clone().requires_grad_(True)
    b = b0.detach().clone().requires_grad_(True)
    total = sum(cfg.iterations)
    bar = tqdm(total=total, desc="affine-opt", disable=not progress, leave=False)
    for scale, iters in zip(cfg.scales, cfg.iterations):
        fs = scaled_shape(fixed.shape[2:], scale, cfg.min_size)
        ms = scaled_shape(moving.shape[2:], scale, cfg.min_size)
        f = resample_image(fixed, fs)
        m = resample_image(moving, ms)
        opt = torch.optim.Adam([A, b], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1), eta_min=cfg.lr * 0.05)
        for it in range(iters):
            opt.zero_grad(set_to_none=True)
            loss = sim(warp(m, affine_map(A, b, fs)), f)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if it % 25 == 0 or it == iters - 1:
                log.debug("affine-opt scale %.2f it %d loss %.5f", scale, it, loss.item())
                cfg.history.append({"stage": "affine", "scale": scale, "iter": it, "loss": loss.item()})
    bar.close()
    return A.detach(), b.detach()
