"""``python -m avsm.eval.worker SPEC.json``: run one evaluation job in a fresh process.

Used by :func:`avsm.eval.runner.evaluate` with ``isolate=True`` so that the
peak resident memory (VmHWM) belongs to that job alone.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        spec = json.load(fh)
    cfg_d = spec["config"]
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(cfg_d.get("threads", 2)))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from avsm.eval.pairs import Pair
    from avsm.eval.runner import EvalConfig, Job, run_job

    torch.set_num_threads(int(cfg_d.get("threads", 2)))
    cfg = EvalConfig(**cfg_d)
    job_d = spec["job"]
    job = Job(job_d["method"], tuple(job_d["pairs"]), bool(job_d["extra_reverse"]))
    pairs = [Pair(**p) for p in spec["pairs"]]
    run_job(job, pairs, cfg, memory_method="peak RSS (VmHWM) of a fresh subprocess per job (both directions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
