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


@dataclass(frozen=True)
class VelocityStep:
    """One vSVF step as recorded: enough to regenerate its map exactly.

    Attributes:
        v: ``(1, 3, d, h, w)`` low-resolution velocity (unit coordinates per unit time).
        method: integrator (:data:`INTEGRATORS`); steps: ``rk4``/``euler`` time steps;
        squarings: ``ss`` squarings.
    """

    v: torch.Tensor
    method: str = "ss"
    steps: int = 10
    squarings: int = 7


def _exp_low(u: torch.Tensor, *, method: str, steps: int, squarings: int,
             identity: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(u)`` on ``u``'s own (low-resolution) grid, ``(B, 3, d, h, w)``."""
    idm = identity if identity is not None else identity_map(u.shape[2:])
    idm = idm.to(dtype=u.dtype, device=u.device)
    if method == "ss":
        return svf_exp(u, squarings=squarings, identity=idm)
    return advect_map(idm.expand(u.shape[0], *idm.shape[1:]), -u, steps=steps,
                      method=method)  # type: ignore[arg-type]


def step_map(phi0: torch.Tensor, v: torch.Tensor, full_shape: Sequence[int], *, method: str = "ss",
             steps: int = 10, squarings: int = 7, identity: torch.Tensor | None = None) -> torch.Tensor:
    """``Φ0 ∘ exp(−v)`` on the full-resolution grid: the map after one vSVF step.

    Args:
        phi0: ``(B, 3, D, H, W)`` map before the step.
        v: ``(B, 3, d, h, w)`` low-resolution velocity.
        full_shape: ``(D, H, W)`` of the result.
        method, steps, squarings: the integrator (see :class:`VSVF`).
        identity: cached identity map of the low grid (optional).

    Returns:
        ``(B, 3, *full_shape)`` map.
    """
    low = tuple(v.shape[2:])
    phi0_low = resample_map(phi0, low)
    if method == "ss":
        phi_low = compose(phi0_low, _exp_low(-v, method=method, steps=steps, squarings=squarings,
                                             identity=identity))
    else:
        phi_low = advect_map(phi0_low, v, steps=steps, method=method)  # type: ignore[arg-type]
    return resample_map(phi_low, full_shape)


def exp_map(v: torch.Tensor, full_shape: Sequence[int], *, method: str = "ss", steps: int = 10,
            squarings: int = 7, identity: torch.Tensor | None = None) -> torch.Tensor:
    """Full-resolution ``exp(v)`` (time-1 flow of the low-resolution ``v``), ``(B, 3, *full_shape)``."""
    return resample_map(_exp_low(v, method=method, steps=steps, squarings=squarings, identity=identity),
                        full_shape)


def replay(phi0: torch.Tensor, steps: Sequence[VelocityStep], full_shape: Sequence[int]) -> torch.Tensor:
    """The forward map ``Φ0 ∘ exp(−v_1) ∘ … ∘ exp(−v_k)`` from recorded steps.

    The same operations as the registration ran, so the map is reproduced exactly
    (this is how a compact transform file is turned back into maps).

    Args:
        phi0: ``(1, 3, *full_shape)`` initial (affine) map.
        steps: the recorded steps, in order.
        full_shape: fixed working grid ``(D, H, W)``.
    """
    phi = phi0
    for st in steps:
        phi = step_map(phi, st.v.to(phi.dtype), full_shape, method=st.method, steps=st.steps,
                       squarings=st.squarings)
    return phi


def replay_inverse(phi0_inverse: torch.Tensor, steps: Sequence[VelocityStep],
                   full_shape: Sequence[int]) -> torch.Tensor:
    """The inverse ``exp(v_k) ∘ … ∘ exp(v_1) ∘ Φ0⁻¹`` from recorded steps (see :meth:`VSVF.inverse`).

    Args:
        phi0_inverse: ``(1, 3, *moving_shape)`` inverse of the initial map (into fixed unit coordinates).
        steps: the recorded steps, in the order they were applied.
        full_shape: fixed working grid ``(D, H, W)`` the velocities' maps live on.
    """
    phi_inv = phi0_inverse
    for st in steps:
        e = exp_map(st.v.to(phi_inv.dtype), full_shape, method=st.method, steps=st.steps,
                    squarings=st.squarings)
        phi_inv = compose(e, phi_inv)
    return phi_inv


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
        phi = step_map(phi0, v, self.full_shape, method=self.method, steps=self.steps,
                       squarings=self.squarings, identity=self.low_identity)
        return VSVFStep(phi=phi, v=v, energy=self.energy(m, v))

    def exp(self, v: torch.Tensor) -> torch.Tensor:
        """Full-resolution ``exp(v)`` = time-1 flow of ``v`` (= ``advect(id, −v)``), ``(B, 3, *full_shape)``."""
        return exp_map(v, self.full_shape, method=self.method, steps=self.steps, squarings=self.squarings,
                       identity=self.low_identity)

    def record(self, v: torch.Tensor) -> VelocityStep:
        """What regenerates this model's step with velocity ``v`` (see :func:`replay`)."""
        return VelocityStep(v=v.detach(), method=self.method, steps=self.steps, squarings=self.squarings)

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
