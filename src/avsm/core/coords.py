"""Coordinate convention of avsm: the one place where it is defined.

Maps
    A *map* ``phi`` is a tensor of shape ``(B, 3, D, H, W)`` holding **absolute
    coordinates in the unit cube** [0, 1]^3 of the image it points into.
    Channel ``c`` is the coordinate along tensor axis ``c + 2`` (so channel 0
    runs along D, channel 2 along W).  Voxel index ``i`` along an axis of
    length ``N`` sits at unit coordinate ``i / (N - 1)``
    (``align_corners=True``).  An axis of length 1 sits at coordinate 0.

Direction
    ``phi`` is a pull-back (ITK/ANTs convention): for every voxel ``x`` of the
    *fixed* grid, ``phi(x)`` is the point of the *moving* image to read, so the
    warped image is ``moving ∘ phi``.  The inverse map ``phi_inv`` lives on the
    moving grid and points into the fixed image.

Affine maps
    An affine transform is a pair ``(A, b)`` with ``A`` of shape ``(B, 3, 3)``
    and ``b`` of shape ``(B, 3)``, acting on unit coordinates **about the
    centre c = (0.5, 0.5, 0.5)**: ``T(x) = A (x - c) + c + b``.  In this
    centred frame composition is the paper's rule: applying ``(A1, b1)`` then
    ``(A2, b2)`` gives ``(A2 A1, A2 b1 + b2)``.

grid_sample
    :func:`to_grid_sample` is the **only** function that converts to
    ``torch.nn.functional.grid_sample``'s convention ([-1, 1], channels last,
    reversed order).  Nothing else in the package does that conversion.

World geometry (spacing, origin, direction) exists only in :mod:`avsm.io`
and :mod:`avsm.export`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CENTRE = 0.5


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D spatial shape, got {shape}")
    return shape  # type: ignore[return-value]


def unit_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Grid spacing in unit coordinates, ``1/(N-1)`` per axis (0 for N = 1)."""
    return tuple(1.0 / (n - 1) if n > 1 else 0.0 for n in _spatial(shape))  # type: ignore[return-value]


def identity_map(
    shape: Sequence[int],
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Identity map on a grid of spatial ``shape`` (D, H, W).

    Returns:
        ``(batch, 3, D, H, W)`` tensor; channel c at index i equals ``i/(N_c-1)``.
    """
    shape = _spatial(shape)
    axes = [
        torch.linspace(0.0, 1.0, n, dtype=dtype, device=device) if n > 1
        else torch.zeros(1, dtype=dtype, device=device)
        for n in shape
    ]
    grids = torch.meshgrid(*axes, indexing="ij")
    phi = torch.stack(grids, dim=0).unsqueeze(0)
    return phi.expand(batch, 3, *shape).contiguous()


def to_grid_sample(phi: torch.Tensor) -> torch.Tensor:
    """Convert a unit-cube map to ``grid_sample``'s grid (the only such conversion).

    Args:
        phi: ``(B, 3, D, H, W)`` unit coordinates, channel order (D, H, W).

    Returns:
        ``(B, D, H, W, 3)`` in [-1, 1], channel order (W, H, D) as
        ``grid_sample(..., align_corners=True)`` expects.
    """
    if phi.dim() != 5 or phi.shape[1] != 3:
        raise ValueError(f"map must have shape (B, 3, D, H, W), got {tuple(phi.shape)}")
    return (phi * 2.0 - 1.0).permute(0, 2, 3, 4, 1).flip(-1)


def affine_map(
    A: torch.Tensor,
    b: torch.Tensor,
    shape: Sequence[int],
) -> torch.Tensor:
    """Dense map of the centred affine ``x -> A (x - c) + c + b``.

    Args:
        A: ``(B, 3, 3)`` linear part (unit coordinates, channel order D, H, W).
        b: ``(B, 3)`` translation in unit coordinates.
        shape: spatial shape (D, H, W) of the grid the map is evaluated on.

    Returns:
        ``(B, 3, D, H, W)`` map.
    """
    B = A.shape[0]
    idm = identity_map(shape, batch=1, dtype=A.dtype, device=A.device)
    x = idm.reshape(1, 3, -1) - CENTRE
    out = torch.einsum("bij,bjn->bin", A, x.expand(B, 3, x.shape[-1]))
    out = out + (b + CENTRE).unsqueeze(-1)
    return out.reshape(B, 3, *_spatial(shape))


def affine_on_map(A: torch.Tensor, b: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``T ∘ Φ``: the centred affine ``x -> A (x - c) + c + b`` applied to a map's values.

    Args:
        A, b: ``(B, 3, 3)``, ``(B, 3)`` (unit coordinates, channel order D, H, W).
        phi: ``(B, 3, D, H, W)`` map.

    Returns:
        ``(B, 3, D, H, W)``: exact (no interpolation: the affine acts pointwise).
    """
    flat = phi.reshape(phi.shape[0], 3, -1) - CENTRE
    out = torch.einsum("bij,bjn->bin", A.to(phi.dtype), flat) + (b.to(phi.dtype) + CENTRE).unsqueeze(-1)
    return out.reshape(phi.shape)


def compose_affine(
    A2: torch.Tensor, b2: torch.Tensor, A1: torch.Tensor, b1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred-affine composition ``T2 ∘ T1`` (apply T1 first): ``(A2 A1, A2 b1 + b2)``."""
    return A2 @ A1, (A2 @ b1.unsqueeze(-1)).squeeze(-1) + b2


def invert_affine(A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of a centred affine: ``(A^-1, -A^-1 b)``."""
    Ainv = torch.linalg.inv(A)
    return Ainv, -(Ainv @ b.unsqueeze(-1)).squeeze(-1)


def identity_affine(
    batch: int = 1, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b) = (I, 0)`` batched: shapes ``(B, 3, 3)`` and ``(B, 3)``."""
    A = torch.eye(3, dtype=dtype, device=device).expand(batch, 3, 3).clone()
    return A, torch.zeros(batch, 3, dtype=dtype, device=device)


def homogeneous_to_centred(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a corner-origin homogeneous matrix ``(B, 4, 4)`` (``y = M[:3,:3] x + M[:3,3]``
    on unit coordinates) to the centred ``(A, b)`` form."""
    A = M[:, :3, :3]
    t = M[:, :3, 3]
    c = torch.full_like(t, CENTRE)
    b = (A @ c.unsqueeze(-1)).squeeze(-1) + t - c
    return A, b


def centred_to_homogeneous(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`homogeneous_to_centred`: returns ``(B, 4, 4)``."""
    B = A.shape[0]
    c = torch.full_like(b, CENTRE)
    t = b + c - (A @ c.unsqueeze(-1)).squeeze(-1)
    M = torch.zeros(B, 4, 4, dtype=A.dtype, device=A.device)
    M[:, :3, :3] = A
    M[:, :3, 3] = t
    M[:, 3, 3] = 1.0
    return M
