"""QC figures (matplotlib Agg): per-pair panels, det J maps, Dice box plots, Dice-vs-steps curves."""

from avsm.viz.qc import dice_boxplot, jacobian_figure, pair_figure, plot_steps_curve, steps_curve

__all__ = ["dice_boxplot", "jacobian_figure", "pair_figure", "plot_steps_curve", "steps_curve"]
