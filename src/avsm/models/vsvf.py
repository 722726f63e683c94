"""vSVF transformation model: momentum → velocity → advected map (written once).

The momentum ``m`` is supplied by the caller, either an ``nn.Parameter``
optimised per pair (:mod:`avsm.optim.vsvf_opt`) or the output of a network
(:mod:`avsm.models.avsm`).  Everything here is map-based, in unit
coordinates (see :mod:`avsm.core.coords`).

One step, starting from a full-resolution map ``Φ0`` (the affine map, or the
previous step's map):

1. ``v = K ⋆ m`` on the low-resolution grid (multi-Gaussian, then CFL clamp);
2. ``Φ0`` is sampled on the low-resolution grid (exact for affine ``Φ0``);
3. the map is advected with ``v`` over unit time: ``Φ = Φ0 ∘ exp(−v)``, either
   by solving the transport equation (``rk4``, 10 steps: the paper's) or by
   scaling and squaring ``exp(−v)`` and composing (``ss``, 7 squarings);
4. the result is upsampled trilinearly to full resolution.

The inverse of a chain of steps is ``exp(v_k) ∘ … ∘ exp(v_1) ∘ Φ0⁻¹``, built
from ``exp(v) = advect(id, −v)`` and the analytic affine inverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from avsm.core.coords import identity_map, unit_spacing
from avsm.core.integrate import advect_map, cfl_clamp, svf_exp
from avsm.core.sampling import compose, resample_map
from avsm.core.smoothing import DEFAULT_SIGMAS, MultiGaussianSmoother


#: integrators of the map: transport equation (``rk4``, ``euler``) or scaling and squaring (``ss``)
INTEGRATORS = ("rk4", "euler", "ss")


def low_res_shape(shape: Sequence[int], factor: float = 0.5, minimum: int = 4) -> tuple[int, int, int]:
    """Low-resolution grid for the momentum: ``ceil(factor · N)`` per axis, at least ``minimum``."""
    return tuple(max(int(math.ceil(factor * int(n))), min(minimum, int(n))) for n in shape)  # type: ignore[return-value]


@dataclass
class VSVFStep:
    """Output of one vSVF step.

    Attributes:
        phi: ``(B, 3, D, H, W)`` full-resolution map (unit coordinates of the moving image).
        v: ``(B, 3, d, h, w)`` low-resolution velocity.
        energy: ``(B,)`` regulariser ``⟨m, v⟩`` (integral over the unit cube).
    """

    phi: torch.Tensor
    v: torch.Tensor
    energy: torch.Tensor


class VSVF(nn.Module):
    """The vSVF forward model on a fixed pair of grids.

    Args:
        full_shape: spatial shape (D, H, W) of the fixed image grid the map lives on.
        low_shape: momentum/velocity grid; default half of ``full_shape``.
        sigmas, weights: multi-Gaussian kernel (unit-domain σ; weights ∝ σ by default).
        steps: time steps of the ``rk4``/``euler`` integrator over unit time.
        method: ``rk4``, ``euler`` (transport equation) or ``ss`` (scaling and squaring).
        cfl: clamp velocities that would break the CFL condition (``rk4``/``euler`` only:
            scaling and squaring has no such condition).
        squarings: K of the ``ss`` integrator.
    """

    def __init__(
        self,
        full_shape: Sequence[int],
        low_shape: Sequence[int] | None = None,
        *,
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        weights: Sequence[float] | None = None,
        steps: int = 10,
        method: str = "rk4",
        cfl: bool = True,
        squarings: int = 7,
    ) -> None:
        super().__init__()
        self.full_shape = tuple(int(s) for s in full_shape)
        self.low_shape = tuple(int(s) for s in (low_shape or low_res_shape(self.full_shape)))
        self.smoother = MultiGaussianSmoother(self.low_shape, sigmas, weights)
        self.steps = int(steps)
        if method not in INTEGRATORS:
            raise ValueError(f"unknown integrator {method!r}; choose one of {', '.join(INTEGRATORS)}")
        self.method = method
        self.cfl = cfl
        self.squarings = int(squarings)
        # built once: the identity of the low-resolution grid (used by every ``ss`` step)
        self.register_buffer("low_identity", identity_map(self.low_shape), persistent=False)

    def velocity(self, m: torch.Tensor) -> torch.Tensor:
        """``v = K ⋆ m`` (then CFL clamp).  ``m``: ``(B, 3, d, h, w)`` on ``low_shape``."""
        v = self.smoother(m)
        return cfl_clamp(v, self.steps) if (self.cfl and self.method != "ss") else v

    def energy(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``⟨m, v⟩ = ∫ m · v dx`` over the unit cube (Riemann sum), per batch item ``(B,)``."""
        cell = math.prod(unit_spacing(self.low_shape))
        return (m * v).flatten(1).sum(1) * cell

    def forward(self, m: torch.Tensor, phi0: torch.Tensor) -> VSVFStep:
        """One step from the full-resolution map ``phi0`` ``(B, 3, *full_shape)``."""
        if tuple(m.shape[2:]) != self.low_shape:
            raise ValueError(f"momentum grid {tuple(m.shape[2:])} != {self.low_shape}")
        v = self.velocity(m)
        phi0_low = resample_map(phi0, self.low_shape)
        if self.method == "ss":
            phi_low = compose(phi0_low, self._exp_low(-v))
        else:
            phi_low = advect_map(phi0_low, v, steps=self.steps, method=self.method)  # type: ignore[arg-type]
        return VSVFStep(phi=resample_map(phi_low, self.full_shape), v=v, energy=self.energy(m, v))

    def exp(self, v: torch.Tensor) -> torch.Tensor:
        """Full-resolution ``exp(v)`` = time-1 flow of ``v`` (= ``advect(id, −v)``), ``(B, 3, *full_shape)``."""
        return resample_map(self._exp_low(v), self.full_shape)

    def _exp_low(self, u: torch.Tensor) -> torch.Tensor:
        """``exp(u)`` on the low-resolution grid, ``(B, 3, *low_shape)``, by this model's integrator."""
        idm = self.low_identity.to(dtype=u.dtype, device=u.device)
        if self.method == "ss":
            return svf_exp(u, squarings=self.squarings, identity=idm)
        return advect_map(idm.expand(u.shape[0], *idm.shape[1:]), -u, steps=self.steps,
                          method=self.method)  # type: ignore[arg-type]

    def inverse(self, velocities: Sequence[torch.Tensor], phi0_inverse: torch.Tensor) -> torch.Tensor:
        """Inverse of ``Φ0 ∘ exp(−v_1) ∘ … ∘ exp(−v_k)``: ``exp(v_k) ∘ … ∘ exp(v_1) ∘ Φ0⁻¹``.

        Args:
            velocities: the steps' low-resolution velocities, in the order they were applied.
            phi0_inverse: ``(B, 3, *moving_shape)`` inverse of the initial map, on the
                moving grid, pointing into the fixed grid.

        Returns:
            ``(B, 3, *moving_shape)`` map from moving to fixed unit coordinates.
        """
        phi_inv = phi0_inverse
        for v in velocities:
            phi_inv = compose(self.exp(v), phi_inv)
        return phi_inv
