"""Supervised distillation loss: a network's map against a target map (e.g. vSVF-opt's)."""

from __future__ import annotations

import torch


def map_distance_vox(phi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of ``‖Φ − Φ*‖²`` in voxels² of the maps' grid, per batch item.

    Args:
        phi, target: ``(B, 3, D, H, W)`` maps in unit coordinates (the same grid).

    Returns:
        ``(B,)``; 0 exactly when the maps are equal.
    """
    if phi.shape != target.shape:
        raise ValueError(f"maps of different shapes: {tuple(phi.shape)} vs {tuple(target.shape)}")
    scale = torch.tensor([float(s - 1) for s in phi.shape[2:]], dtype=phi.dtype,
                         device=phi.device).view(1, 3, 1, 1, 1)
    return (((phi - target) * scale) ** 2).sum(1).flatten(1).mean(1)


__all__ = ["map_distance_vox"]
