"""``avsm demo``: register the bundled demo pair (Colin27 → MNI 2009c crops, 2.5 mm)."""

from __future__ import annotations

import argparse
import json
import sys

from avsm.cli.register import add_common_options, options_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``demo`` sub-command."""
    p = sub.add_parser("demo", help="register the bundled demo pair (writes images, transforms, JSON, QC)")
    p.add_argument("--out-dir", default="avsm_demo", help="output folder (default ./avsm_demo)")
    add_common_options(p)
    p.set_defaults(func=run_demo, qc=True)


def run_demo(args: argparse.Namespace) -> int:
    """Register the demo pair with its 12 subcortical labels; print the summary."""
    from avsm.data import demo_paths
    from avsm.pipeline import register_pair

    from avsm.threads import apply_threads, resolve_threads

    apply_threads(resolve_threads(getattr(args, "threads", None)))
    d = demo_paths()
    opts = options_from_args(args)
    opts["outputs"].qc = True
    summary = register_pair(str(d["fixed"]), str(d["moving"]), args.out_dir,
                            moving_labels=str(d["moving_labels"]), fixed_labels=str(d["fixed_labels"]),
                            **opts)
    keys = ("method", "time_registration_s", "folds", "mean_dice", "mean_dice_affine_only")
    sys.stdout.write(json.dumps({k: summary.get(k) for k in keys}) + "\n")
    sys.stdout.write(f"outputs in {args.out_dir}\n")
    return 0
