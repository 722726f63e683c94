"""``avsm status OUT``: merge what every shard of a batch wrote, list failed and missing pairs, write the manifest.

Works on the output folder of ``avsm register --pairs`` (writes ``manifest.csv`` and
``manifest.json``) and of ``avsm evaluate`` (writes ``results.csv``, ``summary.csv``,
``summary.md``).  Run it after the shards of a SLURM array (e.g. as a job with
``--dependency=afterany:<array job id>``) or at any time to see progress.  Exit status: 0
when every pair is done, 1 otherwise, 2 when ``OUT`` holds no batch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

STATUSES = ("done", "failed", "running", "missing")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``status`` sub-command."""
    p = sub.add_parser("status", help="progress of a batch: merge the shards, list failed and missing pairs, "
                                      "write the manifest", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT", help="output folder of avsm register --pairs or avsm evaluate")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every output and input (default: hash only files whose size or time changed)")
    p.add_argument("--list", type=int, default=50, metavar="N",
                   help="list at most N failed and N missing pairs (default %(default)s; 0: all)")
    p.set_defaults(func=run)


def _print_list(title: str, recs: list[dict[str, Any]], limit: int) -> None:
    shown = recs if limit <= 0 else recs[:limit]
    for r in shown:
        why = f": {r['error']}" if r.get("error") else ""
        sys.stdout.write(f"{title} {r['name']}{why}\n")
    if len(recs) > len(shown):
        sys.stdout.write(f"... and {len(recs) - len(shown)} more {title} (--list 0 shows all)\n")


def run(args: argparse.Namespace) -> int:
    """Run ``avsm status``."""
    from avsm.jobs import read_plan

    verify = "full" if args.verify else "quick"
    plan = read_plan(args.out_dir)
    if plan.get("kind") == "evaluate":
        from avsm.eval.runner import config_from_plan, merge

        pairs, cfg = config_from_plan(plan)
        cfg.out_dir = args.out_dir
        rows = merge(pairs, cfg, verify=verify)
        from avsm.jobs import collect

        records = collect(args.out_dir, plan["jobs"], verify=verify)
        what, written = "jobs", "results.csv, summary.csv, summary.md"
        n_rows_bad = sum(r.get("status") != "ok" for r in rows)
        extra = f"; {len(rows)} result rows, {n_rows_bad} not ok"
    else:
        from avsm.batch import batch_status

        records = batch_status(args.out_dir, verify=verify, write=True)
        what, written, extra = "pairs", "manifest.csv, manifest.json", ""
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    sys.stdout.write(f"{args.out_dir}: {len(records)} {what}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
                     + extra + "\n")
    _print_list("failed", [r for r in records if r["status"] == "failed"], args.list)
    _print_list("running", [r for r in records if r["status"] == "running"], args.list)
    _print_list("missing", [r for r in records if r["status"] == "missing"], args.list)
    sys.stdout.write(f"wrote {written} in {args.out_dir}\n")
    return 0 if counts["done"] == len(records) else 1
