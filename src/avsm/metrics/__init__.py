"""Evaluation metrics: label overlap, surface distance, regularity and inverse consistency."""

from avsm.metrics.consistency import inverse_consistency, inverse_consistency_error
from avsm.metrics.deformation import FoldStats, fold_stats, sd_log_jacobian, world_jacobian_determinant
from avsm.metrics.distance import array_spacing, hd95, hd95_per_label
from avsm.metrics.overlap import dice_per_label, mean_dice

__all__ = [
    "FoldStats",
    "array_spacing",
    "dice_per_label",
    "fold_stats",
    "hd95",
    "hd95_per_label",
    "inverse_consistency",
    "inverse_consistency_error",
    "mean_dice",
    "sd_log_jacobian",
    "world_jacobian_determinant",
]
