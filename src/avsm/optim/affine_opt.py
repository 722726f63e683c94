"""affine-opt: multi-scale optimisation of a centred affine per image pair.

The 12 parameters ``(A, b)`` (see :mod:`avsm.core.coords`) are optimised with
Adam on a pyramid (scales 0.25, 0.5, 1.0 by default) to minimise a
similarity loss (mk-LNCC by default) between ``moving ∘ T`` and ``fixed``.
Unit coordinates do not depend on the resolution, so the parameters carry
over between scales unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from avsm.core.coords import affine_map
from avsm.core.sampling import Pyramid, level, warp_masked
from avsm.losses.similarity import similarity
from avsm.optim.optimizers import Adam, cosine_lr
from avsm.optim.stopping import RelativeChangeStop

log = logging.getLogger(__name__)


@dataclass
class AffineOptConfig:
    """Settings of affine-opt.

    Attributes:
        scales: pyramid levels, coarse to fine, as fractions of the working grid.
        iterations: maximum Adam iterations per level (cosine-decayed learning rate).
        lr: Adam learning rate (parameters are O(1) unit-cube quantities).
        similarity: similarity name (see :func:`avsm.losses.similarity.similarity`).
        tol: relative loss decrease over ``window`` iterations below which a level
            stops early (0: run every iteration, the paper's schedule).
        window: iterations over which ``tol`` is measured.
        min_size: smallest pyramid side (voxels).
    """

    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    iterations: tuple[int, ...] = (200, 200, 50)
    lr: float = 5e-3
    similarity: str = "lncc"
    tol: float = 0.0
    window: int = 10
    min_size: int = 16

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        self.iterations = tuple(int(i) for i in self.iterations)
        if len(self.scales) != len(self.iterations) or not self.scales:
            raise ValueError("one iteration count per scale is needed")
        if any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must lie in (0, 1], got {self.scales}")
        if any(i < 0 for i in self.iterations) or self.lr <= 0 or self.tol < 0 or self.window < 1:
            raise ValueError("iterations >= 0, lr > 0, tol >= 0 and window >= 1 are needed")


def scaled_shape(shape: Sequence[int], scale: float, min_size: int) -> tuple[int, int, int]:
    """``round(scale · N)`` per axis, never below ``min_size`` (nor above N)."""
    return tuple(min(int(n), max(int(round(scale * int(n))), min_size)) for n in shape)  # type: ignore[return-value]


def optimise_affine(
    fixed: torch.Tensor | Pyramid,
    moving: torch.Tensor | Pyramid,
    A0: torch.Tensor,
    b0: torch.Tensor,
    config: AffineOptConfig | None = None,
    *,
    weight: torch.Tensor | Pyramid | None = None,
    moving_weight: torch.Tensor | Pyramid | None = None,
    history: list[dict] | None = None,
    rigid_frames: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise a centred affine (or a rigid transform) from ``(A0, b0)``.

    Rigid: the world-space rotation ``R`` (parametrised by a rotation vector, applied
    after the start's rotation) and the translation are optimised; in unit coordinates
    the linear part is ``Lm⁻¹ R Lf`` with ``Lf``, ``Lm`` the unit → world linear parts
    of the two working grids (so anisotropic boxes stay rigid in millimetres).

    Args:
        fixed: ``(1, 1, D, H, W)`` fixed image in [0, 1].
        moving: ``(1, 1, d, h, w)`` moving image in [0, 1] (its own grid).
        A0, b0: ``(1, 3, 3)``, ``(1, 3)`` initial transform, fixed → moving unit coordinates.
        config: settings.
        weight: optional ``(1, 1, D, H, W)`` similarity weight in [0, 1] on the fixed grid (a mask).
        moving_weight: optional ``(1, 1, d, h, w)`` mask on the moving grid (warped with the image).
        history: a list that receives one record per iteration (level, iteration, loss).
        rigid_frames: ``(Lf, Lm)``, ``(3, 3)`` unit → world linear parts (mm) of the fixed and
            moving working grids; given, the transform is rigid.
        progress: show a tqdm bar.

    Returns:
        Optimised ``(A, b)`` (detached).
    """
    cfg = config or AffineOptConfig()
    sim = similarity(cfg.similarity)
    b = b0.detach().clone().requires_grad_(True)
    if rigid_frames is None:
        A = A0.detach().clone().requires_grad_(True)
        params = [A, b]

        def linear() -> torch.Tensor:
            return A
    else:
        Lf, Lm = (t.to(A0) for t in rigid_frames)
        R0 = nearest_rotation(Lm @ A0.detach()[0] @ torch.linalg.inv(Lf))
        w = torch.zeros(3, dtype=A0.dtype, device=A0.device, requires_grad=True)
        params = [w, b]
        Lm_inv = torch.linalg.inv(Lm)

        def linear() -> torch.Tensor:
            return (Lm_inv @ R0 @ rotation_matrix(w) @ Lf).unsqueeze(0)
    total = sum(cfg.iterations)
    bar = tqdm(total=total, desc="affine-opt", disable=not progress, leave=False)
    for scale, iters in zip(cfg.scales, cfg.iterations):
        fs = scaled_shape(fixed.shape[2:], scale, cfg.min_size)
        ms = scaled_shape(moving.shape[2:], scale, cfg.min_size)
        f = level(fixed, fs)
        m = level(moving, ms)
        fw = level(weight, fs)
        mw = level(moving_weight, ms)
        if iters == 0:
            continue
        opt = Adam(params, lr=cfg.lr)
        stop = RelativeChangeStop(cfg.tol, cfg.window)
        for it in range(iters):
            opt.zero_grad(set_to_none=True)
            wp, wt = warp_masked(m, mw, affine_map(linear(), b, fs), fw)
            loss = sim(wp, f) if wt is None else sim(wp, f, weight=wt)
            loss.backward()
            opt.step()
            opt.lr = cosine_lr(cfg.lr, it + 1, iters, cfg.lr * 0.05)
            bar.update(1)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"affine-opt loss is {value} at scale {scale}, iteration {it}")
            if history is not None:
                history.append({"stage": "affine", "scale": scale, "iter": it, "loss": value})
            if stop.update(value):
                log.debug("affine-opt scale %.2f stopped at iteration %d", scale, it)
                bar.update(iters - it - 1)
                break
        log.debug("affine-opt scale %.2f: %d iterations, loss %.5f", scale, it + 1, value)
    bar.close()
    with torch.no_grad():
        return linear().detach().clone(), b.detach()


def rotation_matrix(w: torch.Tensor) -> torch.Tensor:
    """``exp([w]×)``: the ``(3, 3)`` rotation of the rotation vector ``w`` (radians), differentiable."""
    z = torch.zeros((), dtype=w.dtype, device=w.device)
    K = torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]),
                     torch.stack([-w[1], w[0], z])])
    return torch.linalg.matrix_exp(K)


def nearest_rotation(M: torch.Tensor) -> torch.Tensor:
    """The rotation closest to ``M`` ``(3, 3)`` in the Frobenius norm (polar decomposition)."""
    U, _, Vh = torch.linalg.svd(M)
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return U @ D @ Vh
