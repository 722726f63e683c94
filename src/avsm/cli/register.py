"""``avsm register``: register one pair (or a CSV of pairs) and write the results."""

from __future__ import annotations

import argparse
import json
import sys

from avsm.errors import AvsmError
from avsm.settings import RegistrationSettings

METHOD_HELP = ("auto (default): opt, the most accurate method within ANTs SyN's time on every input measured "
               "(real cross-subject brains, CT; README), logged; "
               "opt: affine-opt + vSVF-opt, no training needed; affine: affine-opt only; net: the bundled "
               "AVSM network, one pass (brain T1 only); net+opt: the network, then vSVF-opt refinement")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``register`` and ``demo``, grouped as an ANTs user looks for them."""
    from avsm.settings import PRESETS, SIMILARITIES

    g = p.add_argument_group("method")
    g.add_argument("--method", default=None, choices=("auto", "opt", "affine", "net", "net+opt"),
                   help=METHOD_HELP)
    g.add_argument("--transform", default="deformable", choices=("rigid", "affine", "deformable"),
                   help="deformable: affine + vSVF (default); affine or rigid: the linear stage alone "
                        "(rigid: rotation + translation in mm, for longitudinal and same-subject pairs)")
    g.add_argument("--preset", default="fast", choices=tuple(PRESETS),
                   help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    g = p.add_argument_group("initial transform (antsRegistration --initial-moving-transform)")
    g.add_argument("--init", default="auto", metavar="auto|header|com|moments|FILE",
                   help="auto (default): the best of header, centres of mass and principal axes by the "
                        "similarity; header: the images' world positions; com: centres of mass; moments: "
                        "principal axes; FILE: an ANTs/ITK linear transform (fixed → moving, '[FILE,1]' inverts)")
    g = p.add_argument_group("metric and masks (antsRegistration --metric, -x)")
    g.add_argument("--similarity", default=None, choices=SIMILARITIES,
                   help="lncc: mk-LNCC (default); ncc: global correlation; mse; mi: Mattes-style mutual "
                        "information (multi-modal pairs)")
    g.add_argument("--fixed-mask", default=None, help="0/1 mask on the fixed image's grid: the similarity "
                                                      "ignores voxels outside it")
    g.add_argument("--moving-mask", default=None, help="0/1 mask on the moving image's grid")
    g = p.add_argument_group("inputs, working grid and device")
    g.add_argument("--modality", default="auto", choices=("auto", "mr", "ct"),
                   help="auto (default): CT if the intensities look like Hounsfield units (logged); ct: "
                        "window [-1000, 1000] HU, air is background; mr: 0.1/99.9 percentiles")
    g.add_argument("--fixed-series", default=None, metavar="UID",
                   help="SeriesInstanceUID when --fixed is a DICOM folder holding several series")
    g.add_argument("--moving-series", default=None, metavar="UID", help="the same for --moving")
    g.add_argument("--spacing", type=float, default=None,
                   help="working-grid spacing in mm (default: 2 mm for opt, the model's for net)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g = p.add_argument_group("optimisation (antsRegistration --convergence)")
    g.add_argument("--affine-iterations", type=_ints, default=None, metavar="N,N,...",
                   help="affine-opt iterations per level (fast: 100,60 at 1/4, 1/2; paper: 200,200,50)")
    g.add_argument("--vsvf-iterations", type=_ints, default=None, metavar="N,N,...",
                   help="vSVF-opt iterations per level (fast: 40,20,0 at 1/4, 1/2, 1; paper: 60,60,60)")
    g.add_argument("--integrator", default=None, choices=("ss", "rk4", "euler"),
                   help="map integrator: ss (scaling and squaring, fast) or rk4 (the paper's)")
    g.add_argument("--optimizer", default=None, choices=("lbfgs", "lbfgs-nols", "adam"),
                   help="vSVF-opt optimiser (see the README)")
    g = p.add_argument_group("network")
    g.add_argument("--affine-steps", type=int, default=None, help="affine test-time steps (default 7)")
    g.add_argument("--vsvf-steps", type=int, default=None, help="vSVF test-time steps")
    g.add_argument("--model", default=None, help="network weights file (default: the bundled model)")
    g.add_argument("--network-affine", choices=("network", "opt"), default=None,
                   help="affine of net / net+opt: the affine network (the paper's AVSM) or affine-opt from the "
                        "initialisation, then the network's vSVF steps")
    g = p.add_argument_group("outputs")
    g.add_argument("--format", action="append", default=None, metavar="F[,F...]",
                   help="transform formats to write, comma-separated or repeated, from ants "
                        "(0GenericAffine.mat, 1Warp, 1InverseWarp), avsm (compact avsm.npz), composite "
                        "(Composite, InverseComposite), tfm (affine as ITK text), l2r (Learn2Reg "
                        "displacement); default ants,avsm")
    g.add_argument("--qc", action="store_true", help="also write a QC figure (qc.png)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _formats(values: list[str] | None) -> tuple[str, ...]:
    """``--format`` values (repeated and/or comma-separated) as one tuple; default ants, avsm."""
    if not values:
        from avsm.export.itk import DEFAULT_FORMATS

        return DEFAULT_FORMATS
    return tuple(f.strip().lower() for v in values for f in v.split(",") if f.strip())


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


def settings_from_args(args: argparse.Namespace) -> RegistrationSettings:
    """The one :class:`~avsm.settings.RegistrationSettings` of the parsed arguments."""
    import dataclasses

    from avsm.settings import NetworkSettings, preset

    s = preset(args.preset)
    method = args.method or "auto"
    changes: dict = {"method": method, "transform": args.transform, "init": args.init,
                     "modality": args.modality, "similarity": args.similarity,
                     "spacing": args.spacing, "device": args.device,
                     "network": NetworkSettings(model=args.model, affine_steps=args.affine_steps,
                                                vsvf_steps=args.vsvf_steps,
                                                **({"affine": args.network_affine} if args.network_affine else {}))}
    if args.affine_iterations:
        it = tuple(args.affine_iterations)
        key = "linear" if (method == "affine" or args.transform != "deformable") else "affine"
        cur = getattr(s, key)
        scales = cur.scales if len(it) == len(cur.scales) else _default_scales(len(it))
        changes[key] = dataclasses.replace(cur, iterations=it, scales=scales)
    stage = "refine" if method == "net+opt" else "vsvf"
    cfg = getattr(s, stage)
    vs_changes: dict = {}
    if args.vsvf_iterations:
        it = tuple(args.vsvf_iterations)
        vs_changes["iterations"] = it
        if len(it) != len(cfg.scales):
            vs_changes["scales"] = (1.0,) * len(it) if stage == "refine" else _default_scales(len(it))
    if args.integrator:
        vs_changes["integrator"] = args.integrator
    if args.optimizer:
        vs_changes["optimizer"] = args.optimizer
        if args.optimizer == "adam" and cfg.optimizer != "adam":
            vs_changes["lr"] = 0.05
    if vs_changes:
        try:
            changes[stage] = dataclasses.replace(cfg, **vs_changes)
        except ValueError as e:
            raise AvsmError(f"bad optimisation options: {e}") from None
    return s.replace(**changes)


def _default_scales(n: int) -> tuple[float, ...]:
    """``n`` pyramid levels ending at full resolution, halving each time (… 0.25, 0.5, 1)."""
    return tuple(0.5 ** (n - 1 - k) for k in range(n))


def options_from_args(args: argparse.Namespace) -> dict:
    """Keyword options of :func:`avsm.pipeline.register_pair` from parsed arguments."""
    from avsm.pipeline import OutputSettings

    return dict(settings=settings_from_args(args),
                outputs=OutputSettings(formats=_formats(args.format), qc=bool(args.qc)),
                fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
                fixed_series=args.fixed_series, moving_series=args.moving_series, progress=not args.quiet)


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
