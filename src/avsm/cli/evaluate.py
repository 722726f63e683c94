"""``avsm evaluate``: every method on every pair, every metric, one table.

Example::

    avsm evaluate --pairs pairs.csv --methods opt,ants-syn,demons --out-dir eval/ \
        --label-mapping aseg_to_aal.csv

``pairs.csv`` columns: ``moving, fixed, moving_labels, fixed_labels`` (optional
``label_mapping`` and ``id``).  Re-running the same command resumes.  Under
``torchrun --nproc-per-node N`` the jobs are sharded over the ranks and rank 0
writes the merged ``results.csv``, ``summary.csv`` and ``summary.md``.
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
                        "ants-syn, ants-syncc, demons, sitk-affine, niftyreg (pip niftyreg), elastix "
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
    p.add_argument("--threads", type=int, default=2, help="threads per job (torch / ITK)")
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
    try:
        opts = json.loads(args.method_opts) if args.method_opts else {}
    except json.JSONDecodeError as e:
        raise AvsmError(f"--method-opts is not valid JSON: {e}") from e
    cfg = EvalConfig(methods=methods, out_dir=os.path.abspath(args.out_dir), consistency=not args.no_consistency,
                     border=args.border, hd95=not args.no_hd95, spacing=args.spacing, method_opts=opts,
                     isolate=not args.in_process, threads=args.threads, reference=args.reference,
                     qc=args.qc)
    rows = evaluate(pairs, cfg, progress=sys.stderr.isatty())
    if rows is not None:
        with open(os.path.join(cfg.out_dir, "summary.md")) as fh:
            sys.stdout.write(fh.read())
    return 0
