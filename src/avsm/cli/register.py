"""``avsm register``: register one pair (or a CSV of pairs) and write the results."""

from __future__ import annotations

import argparse
import json
import sys

from avsm.errors import AvsmError

METHOD_HELP = ("net: pretrained AVSM network (default); opt: affine-opt + vSVF-opt (no training); "
               "affine: affine-opt only; net+opt: network then a few vSVF-opt iterations")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``register`` and ``demo``."""
    p.add_argument("--method", default="net", choices=("net", "opt", "affine", "net+opt"), help=METHOD_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--spacing", type=float, default=None,
                   help="working-grid spacing in mm (default: the model's, or 2 mm for opt)")
    p.add_argument("--affine-iterations", type=_ints, default=None, metavar="N,N,N",
                   help="affine-opt iterations per scale 0.25,0.5,1 (default 200,200,50)")
    p.add_argument("--vsvf-iterations", type=_ints, default=None, metavar="N,N,N",
                   help="vSVF-opt L-BFGS iterations per scale (default 60,60,60)")
    p.add_argument("--affine-steps", type=int, default=None, help="network: affine test-time steps (default 7)")
    p.add_argument("--vsvf-steps", type=int, default=None, help="network: vSVF test-time steps")
    p.add_argument("--model", default=None, help="network weights file (default: the bundled model)")
    p.add_argument("--format", action="append", default=None, choices=("ants", "l2r"),
                   help="transform formats to write (default ants; repeat for more)")
    p.add_argument("--qc", action="store_true", help="also write a QC figure (qc.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``register`` sub-command."""
    p = sub.add_parser("register", help="register a moving image to a fixed image",
                       description="Register --moving to --fixed. Results go onto the fixed image's grid.")
    p.add_argument("--fixed", help="fixed (target) image: NIfTI, NRRD or MHA")
    p.add_argument("--moving", help="moving (source) image")
    p.add_argument("--moving-labels", help="label map of the moving image, warped to the fixed grid")
    p.add_argument("--fixed-labels", help="label map of the fixed image, for Dice in the summary")
    p.add_argument("--label-mapping", help="CSV fixed_label,moving_label when the protocols differ")
    p.add_argument("--pairs", help="CSV of pairs (moving,fixed[,moving_labels,fixed_labels][,name]) to batch")
    p.add_argument("--workers", type=int, default=1, help="batch: worker processes on CPU")
    p.add_argument("--out-dir", required=True, help="output folder (created if missing)")
    add_common_options(p)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> dict:
    """Keyword options of :func:`avsm.pipeline.register_pair` from parsed arguments."""
    return dict(
        method=args.method, device=args.device, spacing=args.spacing, qc=args.qc,
        formats=tuple(args.format or ("ants",)), affine_iterations=args.affine_iterations,
        vsvf_iterations=args.vsvf_iterations, affine_steps=args.affine_steps,
        vsvf_steps=args.vsvf_steps, model=args.model, progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``avsm register``."""
    from avsm.pipeline import register_pair

    if args.pairs:
        from avsm.batch import run_batch

        rows = run_batch(args.pairs, args.out_dir, register_one=register_pair, workers=args.workers,
                         **options_from_args(args))
        failed = [r for r in rows if r.get("status") == "failed"]
        sys.stdout.write(f"{len(rows) - len(failed)} pairs done, {len(failed)} failed; "
                         f"manifest in {args.out_dir}\n")
        return 1 if failed else 0
    if not args.fixed or not args.moving:
        if args.fixed or args.moving:
            raise AvsmError("give both --fixed and --moving (or --pairs)")
        from avsm.cli.demo import run_demo

        return run_demo(args)
    summary = register_pair(args.fixed, args.moving, args.out_dir, moving_labels=args.moving_labels,
                            fixed_labels=args.fixed_labels, label_mapping=args.label_mapping,
                            **options_from_args(args))
    sys.stdout.write(json.dumps({k: summary[k] for k in summary if k in
                                 ("method", "time_registration_s", "folds", "mean_dice",
                                  "mean_dice_affine_only")}) + "\n")
    return 0
