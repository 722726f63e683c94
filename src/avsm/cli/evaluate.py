"""``avsm evaluate``: every method on every pair, every metric, one table.

Example::

    avsm evaluate --pairs pairs.csv --methods opt,ants-syn,demons --out-dir eval/ \
        --label-mapping aseg_to_aal.csv

``pairs.csv`` is the file of ``avsm register --pairs``: columns ``moving, fixed``, and
``moving_labels, fixed_labels`` for the label metrics, optionally ``name`` (or ``id``) and
``label_mapping`` (mask columns are accepted but not used).  Re-running the same command
resumes: a job (method × pair) is recomputed only when an input's content, the method or an
option changed, or when it failed.  Exit status 1 when a job failed.

Spread the jobs with ``--workers N`` (local processes, or Dask workers with ``--scheduler``)
and ``--shard I/N`` (default from a SLURM job array or torchrun's RANK/WORLD_SIZE); with
several shards ``avsm status OUT_DIR`` merges ``results.csv``, ``summary.csv`` and
``summary.md`` once they are finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    """Register the ``evaluate`` sub-command (sets ``args.func``)."""
    p = subparsers.add_parser("evaluate", help="evaluate methods on labelled pairs (Dice, HD95, folds, ...)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="CSV with columns moving,fixed,moving_labels,fixed_labels")
    p.add_argument("--methods", default="opt,ants-syn,demons",
                   help="comma-separated methods: identity, affine, opt, net, net-s<k>, net+opt, "
                        "ants-syn, ants-syncc, ants-syn-cc (antsRegistrationSyN[s]), ants-syn-quick "
                        "(antsRegistrationSyNQuick[s]), fireants (pip fireants, see avsm.baselines.fireants), "
                        "demons, sitk-affine, niftyreg (pip niftyreg), elastix "
                        "(elastix CLI), voxelmorph (trained weights, scripts/train_voxelmorph.sh) "
                        "(default: %(default)s)")
    p.add_argument("--out-dir", required=True, help="output folder (rows/, results.csv, summary.*)")
    p.add_argument("--label-mapping", default=None,
                   help="CSV 'fixed_label,moving_label' for rows without their own label_mapping column")
    p.add_argument("--spacing", type=float, default=2.0, help="working-grid spacing in mm (default %(default)s)")
    p.add_argument("--border", type=int, default=10, help="voxels ignored for inverse consistency")
    p.add_argument("--no-consistency", action="store_true", help="skip the inverse-consistency measure")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95")
    p.add_argument("--in-process", action="store_true",
                   help="run jobs in this process (faster start, but peak memory is not per job)")
    from avsm.cli.register import add_distribution_options
    from avsm.threads import add_threads_argument

    add_threads_argument(p, per=" per job")
    add_distribution_options(p)
    p.add_argument("--method-opts", default=None,
                   help='JSON {"method": {kwarg: value}} passed to the methods')
    p.add_argument("--reference", default="ants-syn", help="method for the time ratio (default %(default)s)")
    p.add_argument("--qc", action="store_true", help="write QC figures per pair and method to OUT_DIR/qc/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``avsm evaluate``; returns the exit code."""
    from avsm.errors import AvsmError
    from avsm.eval.pairs import read_pairs
    from avsm.eval.runner import EvalConfig, evaluate

    pairs = read_pairs(args.pairs, label_mapping=args.label_mapping)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise AvsmError("--methods is empty")
    if len(set(methods)) != len(methods):
        raise AvsmError(f"--methods names a method twice: {args.methods}")
    try:
        opts = json.loads(args.method_opts) if args.method_opts else {}
    except json.JSONDecodeError as e:
        raise AvsmError(f"--method-opts is not valid JSON: {e}") from e
    if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
        raise AvsmError('--method-opts must be a JSON object {"method": {"kwarg": value}}')
    if any(p.fixed_mask or p.moving_mask for p in pairs):
        log.warning("%s: avsm evaluate does not use the mask columns", args.pairs)
    cfg = EvalConfig(methods=methods, out_dir=os.path.abspath(args.out_dir), consistency=not args.no_consistency,
                     border=args.border, hd95=not args.no_hd95, spacing=args.spacing, method_opts=opts,
                     isolate=not args.in_process, threads=args.threads, reference=args.reference,
                     qc=args.qc, workers=args.workers or 1, scheduler=args.scheduler,
                     job_timeout_s=args.job_timeout)
    rows = evaluate(pairs, cfg, shard=args.shard,
                    progress=sys.stderr.isatty() and not getattr(args, "quiet", False))
    if rows is None:  # one shard of several: its own jobs only
        from avsm.jobs import collect, plan_entry

        from avsm.eval.runner import eval_jobs
        from avsm.executors import resolve_shard

        mine = resolve_shard(args.shard).select(eval_jobs(pairs, cfg))
        states = collect(cfg.out_dir, [plan_entry(j) for j in mine])
        bad = [s for s in states if s["status"] != "done"]
        for s in bad:
            sys.stdout.write(f"{s['status']} {s['name']}: {s.get('error')}\n")
        sys.stdout.write(f"shard done: {len(mine) - len(bad)} of {len(mine)} jobs finished; "
                         f"'avsm status {args.out_dir}' merges the shards\n")
        return 1 if any(s["status"] == "failed" for s in bad) else 0
    with open(os.path.join(cfg.out_dir, "summary.md")) as fh:
        sys.stdout.write(fh.read())
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in failed:
        sys.stdout.write(f"{r.get('status')} {r['method']} on {r['pair_id']}: {r.get('error')}\n")
    return 1 if failed else 0
