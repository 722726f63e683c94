"""Multi-step affine registration network (the affine half of AVSM).

One step of the paper's multi-step affine network:

1. warp the **original** moving image with the current affine map on the
   fixed grid, ``warped_t = I_m ∘ T_{t-1}``;
2. the CNN (:class:`avsm.nets.affine_net.AffineNet`) predicts a residual
   ``(Ã, b̃)`` from ``(warped_t, I_f)``;
3. compose with the paper's rule (:func:`avsm.core.coords.compose_affine`):
   ``A_t = Ã A_{t-1}``, ``b_t = Ã b_{t-1} + b̃``.

The moving image is interpolated once per step, always from the original, so
interpolation errors do not accumulate.  All affines are centred, in unit
coordinates (see :mod:`avsm.core.coords`): ``(A, b)`` maps fixed unit
coordinates to moving unit coordinates, and the moving image may lie on any
grid (its own working grid).

Losses (:meth:`MultiStepAffine.loss`)::

    L = mkLNCC(I_m ∘ T, I_f) + λ_ar(epoch) · ‖(A, b) − (A0, b0)‖²
        [+ λ_as · ‖A_ts A_st − I‖² + ‖A_ts b_st + b_ts‖²   (symmetric mode)]

with ``λ_ar(epoch) = C K / (K + e^{epoch/K})`` (C = 10, K = 4 by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from avsm.core.coords import affine_map, compose_affine, identity_affine, invert_affine
from avsm.core.sampling import warp
from avsm.losses.consistency import affine_inverse_consistency, decaying_weight
from avsm.losses.lncc import MKLNCC
from avsm.nets.affine_net import AffineNet


@dataclass
class AffineOutput:
    """Result of a multi-step affine forward pass.

    Attributes:
        A: ``(B, 3, 3)`` final linear part (fixed unit → moving unit coordinates, centred).
        b: ``(B, 3)`` final translation (unit coordinates).
        warped: ``(B, C, D, H, W)`` moving image warped onto the fixed grid with ``(A, b)``.
        steps: ``[(A_t, b_t), ...]`` the composed affine after every step.
    """

    A: torch.Tensor
    b: torch.Tensor
    warped: torch.Tensor
    steps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on CUDA only (a disabled context elsewhere)."""
    on_cuda = device.type == "cuda"
    return torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=torch.bfloat16,
                          enabled=bool(enabled and on_cuda))


class MultiStepAffine(nn.Module):
    """Multi-step affine network around a single-step :class:`AffineNet`.

    Args:
        net: the one-step CNN (residual affine, identity at initialisation).
        steps_train: number of steps in training mode (paper: 3 after the single-step phase).
        steps_test: number of steps in evaluation mode (paper: 7).
        amp: bf16 autocast for the CNN on CUDA (sampling and losses stay float32).
    """

    def __init__(self, net: AffineNet, steps_train: int = 3, steps_test: int = 7, *, amp: bool = True) -> None:
        super().__init__()
        if steps_train < 1 or steps_test < 1:
            raise ValueError("steps_train and steps_test must be >= 1")
        self.net = net
        self.steps_train = int(steps_train)
        self.steps_test = int(steps_test)
        self.amp = amp

    def default_steps(self) -> int:
        """Steps used when ``steps`` is ``None``: train or test count by ``self.training``."""
        return self.steps_train if self.training else self.steps_test

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        A0: torch.Tensor | None = None,
        b0: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> AffineOutput:
        """Run ``steps`` affine steps.

        Args:
            moving: ``(B, C, d, h, w)`` moving image on any grid.
            fixed: ``(B, C, D, H, W)`` fixed image.
            A0, b0: ``(B, 3, 3)``, ``(B, 3)`` initial affine (default identity), e.g. the
                physical identity between the two working grids.
            steps: number of steps (default: :meth:`default_steps`).

        Returns:
            :class:`AffineOutput` with the composed affine and the final warped image.
        """
        B = fixed.shape[0]
        if A0 is None or b0 is None:
            A0, b0 = identity_affine(B, dtype=torch.float32, device=fixed.device)
        A, b = A0.to(torch.float32), b0.to(torch.float32)
        if A.shape[0] != B:
            A, b = A.expand(B, 3, 3), b.expand(B, 3)
        n = self.default_steps() if steps is None else int(steps)
        shape = tuple(fixed.shape[2:])
        history: list[tuple[torch.Tensor, torch.Tensor]] = []
        warped = warp(moving, affine_map(A, b, shape))
        for _ in range(n):
            with _autocast(fixed.device, self.amp):
                dA, db = self.net(warped, fixed)
            A, b = compose_affine(dA.float(), db.float(), A, b)
            history.append((A, b))
            warped = warp(moving, affine_map(A, b, shape))
        return AffineOutput(A=A, b=b, warped=warped, steps=history)

    def loss(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        A0: torch.Tensor | None = None,
        b0: torch.Tensor | None = None,
        *,
        epoch: float = 0.0,
        steps: int | None = None,
        symmetric: bool = True,
        sym_weight: float = 10.0,
        reg_C: float = 10.0,
        reg_K: float = 4.0,
        reg_min: float = 1e-3,
        similarity: nn.Module | None = None,
    ) -> tuple[AffineOutput, dict[str, torch.Tensor]]:
        """Forward pass and training loss (means over the batch, scalars).

        ``symmetric`` also registers ``(fixed, moving)`` from the inverse initial
        affine and adds ``sym_weight · affine_inverse_consistency``; the similarity
        and regularisation terms are then averaged over both directions.
        The two images must then lie on grids of the same shape.

        Returns:
            ``(forward output, {"total", "sim", "reg", "sym", "lambda_reg"})``.
        """
        sim_fn = similarity if similarity is not None else MKLNCC()
        B = fixed.shape[0]
        if A0 is None or b0 is None:
            A0, b0 = identity_affine(B, dtype=torch.float32, device=fixed.device)
        lam = max(decaying_weight(epoch, reg_C, reg_K), reg_min)
        out = self.forward(moving, fixed, A0, b0, steps=steps)
        sim = sim_fn(out.warped, fixed)
        reg = _affine_deviation(out.A, out.b, A0, b0).mean()
        sym = torch.zeros((), device=fixed.device)
        if symmetric:
            Ai, bi = invert_affine(A0.to(torch.float32), b0.to(torch.float32))
            rev = self.forward(fixed, moving, Ai, bi, steps=steps)
            sim = 0.5 * (sim + sim_fn(rev.warped, moving))
            reg = 0.5 * (reg + _affine_deviation(rev.A, rev.b, Ai, bi).mean())
            sym = affine_inverse_consistency(out.A, out.b, rev.A, rev.b).mean()
        total = sim + lam * reg + (sym_weight * sym if symmetric else 0.0)
        losses = {"total": total, "sim": sim.detach(), "reg": reg.detach(), "sym": sym.detach(),
                  "lambda_reg": torch.tensor(lam)}
        return out, losses


def _affine_deviation(A: torch.Tensor, b: torch.Tensor, A0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """``‖A − A0‖²_F + ‖b − b0‖²`` per item ``(B,)``."""
    return ((A - A0.to(A.dtype)) ** 2).sum((1, 2)) + ((b - b0.to(b.dtype)) ** 2).sum(1)


def affine_steps_product(steps: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose residual affines ``[(Ã_1, b̃_1), ...]`` in application order (helper for tests)."""
    if not steps:
        raise ValueError("need at least one affine")
    A, b = steps[0]
    for dA, db in steps[1:]:
        A, b = compose_affine(dA, db, A, b)
    return A, b
