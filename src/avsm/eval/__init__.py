"""Evaluation harness (``avsm evaluate``): methods × pairs → results.csv and a Table-1 summary."""

from avsm.eval.pairs import Pair, read_label_mapping, read_pairs, write_pairs
from avsm.eval.runner import EvalConfig, Job, eval_jobs, evaluate, evaluate_result, merge, plan_jobs, summarize

__all__ = [
    "EvalConfig",
    "Job",
    "Pair",
    "eval_jobs",
    "evaluate",
    "evaluate_result",
    "merge",
    "plan_jobs",
    "read_label_mapping",
    "read_pairs",
    "summarize",
    "write_pairs",
]
