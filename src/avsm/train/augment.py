"""Data augmentation for registration training (torch, on a working grid).

Every function takes an explicit :class:`torch.Generator`, so a sample is a
pure function of its seed (this is what makes resumed and distributed runs
reproducible).  Images are ``(1, 1, D, H, W)`` float tensors in [0, 1],
label maps ``(1, 1, D, H, W)`` integer tensors; maps follow
:mod:`avsm.core.coords` (pull-back, unit coordinates).

Spatial augmentation: ``x -> T(ψ(x))`` with a random centred affine ``T``
and a random smooth diffeomorphism ``ψ = exp(v)`` (a smooth random
stationary velocity integrated with :func:`avsm.core.integrate.advect_map`).
Intensity augmentation: gamma, a smooth multiplicative bias field, Gaussian
noise, then a rescale to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from avsm.core.coords import affine_on_map, identity_map
from avsm.core.integrate import advect_map
from avsm.core.sampling import resample_map, warp


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation.

    Attributes:
        rotation_deg: max |rotation| per axis (degrees).
        scale: max |log-scale| per axis (0.1 ≈ ±10 %).
        shear: max |off-diagonal| shear.
        translation: max |translation| per axis (unit coordinates).
        warp_amplitude: std of the random velocity (unit coordinates per unit time).
        warp_control: control-grid size of the random velocity (per axis).
        gamma: max |log gamma|.
        bias: std of the log bias field.
        noise: max std of additive Gaussian noise.
        p_affine, p_warp, p_intensity: probabilities of each augmentation.
        random_strength: scale all spatial ranges of each volume by ``s ~ U(0, 1)``, so
            that nearly aligned pairs are as common as strongly misaligned ones (a network
            that only sees large misalignments learns to always deform).
    """

    rotation_deg: float = 12.0
    scale: float = 0.12
    shear: float = 0.06
    translation: float = 0.06
    warp_amplitude: float = 0.04
    warp_control: int = 5
    gamma: float = 0.35
    bias: float = 0.25
    noise: float = 0.03
    p_affine: float = 0.9
    p_warp: float = 0.9
    p_intensity: float = 0.9
    random_strength: bool = True

    def scaled(self, k: float) -> AugmentConfig:
        """The same config with every spatial range (rotation, scale, shear, translation, warp)
        multiplied by ``k`` (the per-volume strength of ``random_strength``)."""
        return replace(self, rotation_deg=k * self.rotation_deg, scale=k * self.scale, shear=k * self.shear,
                       translation=k * self.translation, warp_amplitude=k * self.warp_amplitude)


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def random_affine(g: torch.Generator, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A random centred affine ``(A (1,3,3), b (1,3))`` in unit coordinates (float32)."""
    ang = _uniform(g, -1.0, 1.0, 3) * math.radians(cfg.rotation_deg)
    c, s = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones(()), torch.zeros(())
    Rx = torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, c[0], -s[0]]),
                      torch.stack([zero, s[0], c[0]])]).double()
    Ry = torch.stack([torch.stack([c[1], zero, s[1]]), torch.stack([zero, one, zero]),
                      torch.stack([-s[1], zero, c[1]])]).double()
    Rz = torch.stack([torch.stack([c[2], -s[2], zero]), torch.stack([s[2], c[2], zero]),
                      torch.stack([zero, zero, one])]).double()
    S = torch.diag(torch.exp(_uniform(g, -cfg.scale, cfg.scale, 3)))
    Sh = torch.eye(3, dtype=torch.float64) + torch.triu(
        (_uniform(g, -cfg.shear, cfg.shear, 9)).reshape(3, 3), diagonal=1)
    A = Rz @ Ry @ Rx @ Sh @ S
    b = _uniform(g, -cfg.translation, cfg.translation, 3)
    return A.float().unsqueeze(0), b.float().unsqueeze(0)


def random_velocity(g: torch.Generator, shape: tuple[int, int, int], cfg: AugmentConfig) -> torch.Tensor:
    """Smooth random velocity ``(1, 3, *shape)``: Gaussian noise on a coarse grid, cubic-ish upsampled."""
    n = max(int(cfg.warp_control), 2)
    coarse = torch.randn(1, 3, n, n, n, generator=g) * cfg.warp_amplitude
    # zero momentum at the border of the control grid keeps the box roughly in place
    coarse[:, :, [0, -1]] *= 0.3
    coarse[:, :, :, [0, -1]] *= 0.3
    coarse[:, :, :, :, [0, -1]] *= 0.3
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def random_map(g: torch.Generator, shape: tuple[int, int, int], cfg: AugmentConfig,
               *, affine: bool = True, deform: bool = True) -> torch.Tensor:
    """Random spatial map ``(1, 3, *shape)``: ``x -> T(exp(v)(x))`` (each part optional)."""
    phi = identity_map(shape)
    if deform and float(torch.rand((), generator=g)) < cfg.p_warp:
        low = tuple(max(s // 2, 4) for s in shape)
        v = random_velocity(g, low, cfg)  # type: ignore[arg-type]
        ex = advect_map(identity_map(low), -v, steps=6)
        phi = resample_map(ex, shape)
    if affine and float(torch.rand((), generator=g)) < cfg.p_affine:
        A, b = random_affine(g, cfg)
        phi = affine_on_map(A, b, phi)
    return phi


def _smooth_field(g: torch.Generator, shape: tuple[int, int, int], n: int, std: float) -> torch.Tensor:
    coarse = torch.randn(1, 1, n, n, n, generator=g) * std
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def augment_intensity(image: torch.Tensor, g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Gamma, bias field and noise; result rescaled to [0, 1].  ``image``: ``(1, 1, D, H, W)``."""
    if float(torch.rand((), generator=g)) >= cfg.p_intensity:
        return image
    x = image.clamp(0.0, 1.0)
    gamma = math.exp(float(_uniform(g, -cfg.gamma, cfg.gamma)))
    x = x.pow(gamma)
    shape = tuple(int(s) for s in x.shape[2:])
    x = x * torch.exp(_smooth_field(g, shape, 4, cfg.bias))  # type: ignore[arg-type]
    sd = float(_uniform(g, 0.0, cfg.noise))
    fg = (image > 0.02).to(x.dtype)
    x = x + sd * torch.randn(x.shape, generator=g) * fg
    hi = torch.quantile(x.flatten()[:: max(x.numel() // 200000, 1)], 0.999).clamp_min(1e-6)
    return (x / hi).clamp(0.0, 1.0)


def augment_volume(
    image: torch.Tensor,
    labels: torch.Tensor | None,
    g: torch.Generator,
    cfg: AugmentConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random spatial + intensity augmentation of one volume (and its labels, nearest-neighbour).

    Args:
        image: ``(1, 1, D, H, W)`` float in [0, 1].
        labels: ``(1, 1, D, H, W)`` integer labels, or ``None``.
        g: random generator (the only source of randomness).
        cfg: ranges.

    Returns:
        ``(image, labels)`` on the same grid.
    """
    shape = tuple(int(s) for s in image.shape[2:])
    if cfg.random_strength:
        cfg = cfg.scaled(float(torch.rand((), generator=g)))
    phi = random_map(g, shape, cfg)  # type: ignore[arg-type]
    img = warp(image, phi)
    lab = warp(labels, phi, mode="nearest") if labels is not None else None
    return augment_intensity(img, g, cfg), lab
