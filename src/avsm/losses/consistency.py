"""Inverse-consistency losses (affine and dense) and the identity regulariser for affines."""

from __future__ import annotations

import math

import torch

from avsm.core.coords import identity_map
from avsm.core.sampling import compose


def affine_inverse_consistency(
    A_st: torch.Tensor, b_st: torch.Tensor, A_ts: torch.Tensor, b_ts: torch.Tensor
) -> torch.Tensor:
    """``‖A_ts A_st − I‖²_F + ‖A_ts b_st + b_ts‖²`` per item ``(B,)``: 0 for an exact inverse pair.

    This is the affine part of ``T_ts ∘ T_st = id`` in the centred frame.
    """
    eye = torch.eye(3, dtype=A_st.dtype, device=A_st.device)
    m = ((A_ts @ A_st - eye) ** 2).sum((1, 2))
    t = (((A_ts @ b_st.unsqueeze(-1)).squeeze(-1) + b_ts) ** 2).sum(1)
    return m + t


def affine_identity_penalty(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖A − I‖²_F + ‖b‖²`` per item ``(B,)``: the regulariser toward the identity."""
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    return ((A - eye) ** 2).sum((1, 2)) + (b ** 2).sum(1)


def decaying_weight(epoch: float, C: float = 10.0, K: float = 4.0) -> float:
    """The paper's epoch-decaying weight ``λ = C·K / (K + e^{n/K})``."""
    return C * K / (K + math.exp(epoch / K))


def map_inverse_consistency(phi_st: torch.Tensor, phi_ts: torch.Tensor) -> torch.Tensor:
    """``mean ‖Φ_st ∘ Φ_ts − id‖²`` per item ``(B,)``.

    ``phi_st``: ``(B, 3, *grid_s?)``; the composition is evaluated on ``phi_ts``'s grid.
    """
    comp = compose(phi_st, phi_ts)
    idm = identity_map(phi_ts.shape[2:], dtype=phi_ts.dtype, device=phi_ts.device)
    return ((comp - idm) ** 2).flatten(1).mean(1) * 3.0
