"""``avsm register``: register one pair (or a CSV of pairs) and write the results."""

from __future__ import annotations

import argparse
import json
import sys

from avsm.errors import AvsmError
from avsm.settings import DEFAULT_PRESET, RegistrationSettings

METHOD_HELP = ("auto (default): opt, the most accurate method within ANTs SyN's time on every input measured "
               "(real cross-subject brains, CT; README), logged; "
               "opt: affine-opt + vSVF-opt, no training needed; affine: affine-opt only; net: the bundled "
               "AVSM network, one pass (brain T1 only); net+opt: the network, then vSVF-opt refinement")


def _help_text(text: str) -> str:
    """``text`` as an argparse help string (``%`` escaped)."""
    return text.replace("%", "%%")


def preset_help() -> str:
    """``--preset`` help: every preset of :data:`avsm.settings.PRESETS`, its stages read from its settings."""
    from avsm.settings import PRESETS

    return _help_text("levels are fractions of the working grid (native: the image's own, the same millimetre levels on coarser images; fast, paper: 2 mm). "
                      + " | ".join(f"{k}: {v}" for k, v in PRESETS.items()))


def iterations_help(stage: str) -> str:
    """``--affine-iterations`` / ``--vsvf-iterations`` help with every preset's counts (from its settings)."""
    from avsm.settings import PRESETS, _level, preset

    def counts(key: str) -> str:
        return "; ".join(f"{name} {','.join(str(i) for i in c.iterations)} at {', '.join(_level(x) for x in c.scales)}"
                         for name in PRESETS for c in (getattr(preset(name), key),))

    if stage == "affine":
        text = (f"affine-opt iterations per level (default: the preset's: {counts('affine')}; linear only, "
                f"--transform rigid/affine or --method affine: {counts('linear')})")
    else:
        text = (f"vSVF-opt iterations per level (default: the preset's: {counts('vsvf')}; the refinement of "
                f"net+opt: {counts('refine')})")
    return _help_text(text)


def _positive_float(text: str, expected: str, too_small: str) -> float:
    """argparse helper: ``text`` as a number > 0, else the error ``expected ...`` / ``too_small``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{too_small}, got {text}")
    return v


def _spacing(text: str) -> float | str:
    if text == "native":
        return text
    return _positive_float(text, "a spacing in mm or 'native'", "spacing must be > 0 mm")


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
    g.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS), help=preset_help())
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
    g.add_argument("--spacing", type=_spacing, default=None, metavar="MM|native",
                   help="working-grid spacing in mm, or 'native' (the fixed image's own, at least 1 mm); "
                        "default: the preset's (native: native; fast, paper: 2 mm), the model's for net")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    from avsm.threads import add_threads_argument

    add_threads_argument(g, per=" per registration")
    g = p.add_argument_group("optimisation (antsRegistration --convergence)")
    g.add_argument("--affine-iterations", type=_ints, default=None, metavar="N,N,...",
                   help=iterations_help("affine"))
    g.add_argument("--vsvf-iterations", type=_ints, default=None, metavar="N,N,...",
                   help=iterations_help("vsvf"))
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
                        "(Composite, InverseComposite), tfm (affine as ITK text), h5 (ITK HDF5 "
                        "Composite.h5, InverseComposite.h5, as antsRegistration --write-composite-transform 1), "
                        "l2r (Learn2Reg displacement); default ants,avsm")
    g.add_argument("--qc", action="store_true", help="also write a QC figure (qc.png)")
    # --quiet (no progress bars) and -v are added to every sub-command by avsm.cli.main


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
    add_batch_options(p)
    p.add_argument("--out-dir", help="output folder (required; created if missing)")
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
                     "spacing": args.spacing if args.spacing is not None else s.spacing, "device": args.device,
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
                fixed_series=args.fixed_series, moving_series=args.moving_series,
                progress=not getattr(args, "quiet", False))


def run(args: argparse.Namespace) -> int:
    """Run ``avsm register``."""
    missing = [opt for opt in ((() if args.pairs else ("--fixed", "--moving")) + ("--out-dir",))
               if not getattr(args, opt[2:].replace("-", "_"))]
    if missing:
        names = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise AvsmError(f"missing {names}: avsm register needs --fixed and --moving (or --pairs CSV for a "
                        f"batch) and --out-dir; 'avsm demo' registers the bundled demo pair")
    from avsm.pipeline import register_pair

    if args.pairs:
        return run_pairs(args)
    from avsm.threads import apply_threads, resolve_threads

    apply_threads(resolve_threads(args.threads))
    summary = register_pair(args.fixed, args.moving, args.out_dir, moving_labels=args.moving_labels,
                            fixed_labels=args.fixed_labels, label_mapping=args.label_mapping,
                            **options_from_args(args))
    sys.stdout.write(json.dumps({k: summary[k] for k in summary if k in
                                 ("method", "time_registration_s", "folds", "mean_dice",
                                  "mean_dice_affine_only")}) + "\n")
    return 0


# --------------------------------------------------------------------------- batch (--pairs)


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """``--pairs`` and how the batch is spread: workers, shard, scheduler (also used by ``evaluate``)."""
    g = p.add_argument_group("batch (--pairs; see 'avsm status')")
    g.add_argument("--pairs", metavar="CSV",
                   help="CSV of pairs to register, columns moving,fixed and optionally name, moving_labels, "
                        "fixed_labels, label_mapping, fixed_mask, moving_mask (--label-mapping, --fixed-mask and "
                        "--moving-mask fill empty cells); resumable: done pairs are skipped")
    add_distribution_options(g)


def _seconds(text: str) -> float:
    return _positive_float(text, "a number of seconds", "must be > 0")


def add_distribution_options(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--workers``, ``--shard``, ``--scheduler``."""
    from avsm.threads import positive_int

    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="pairs in parallel: local worker processes, or Dask workers with --scheduler dask "
                        "(default 1; avsm register --device cuda: one per visible GPU, each pinned to its GPU). "
                        "A worker killed mid-pair costs that pair one attempt (2 in all); the others go on")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="take pairs I, I+N, I+2N, ... (0 <= I < N); default from a SLURM job array "
                        "(SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT) or torchrun (RANK of WORLD_SIZE). Shards "
                        "never wait for each other; a lock per pair keeps two processes off the same pair")
    g.add_argument("--job-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="stop a pair still running after this many seconds (its worker process is killed) and "
                        "record it as failed with the reason; the others go on (local engine; default: no limit)")
    g.add_argument("--scheduler", default="local", metavar="local|dask|ADDRESS",
                   help="local (default): this process or local workers; dask: a local Dask cluster of --workers "
                        "processes; ADDRESS (tcp://host:8786): an existing Dask cluster (pip install 'avsm[dask]')")


def run_pairs(args: argparse.Namespace) -> int:
    """``avsm register --pairs``: this shard's pairs; exit 1 when one of them failed (0 under torchrun)."""
    import os

    from avsm.batch import run_batch
    from avsm.pipeline import register_pair

    given = [o for o in ("fixed", "moving", "fixed_labels", "moving_labels") if getattr(args, o, None)]
    if given:
        raise AvsmError(f"--pairs takes the images and label maps from the CSV; drop "
                        f"{', '.join('--' + o.replace('_', '-') for o in given)} (per-pair columns: moving, fixed, "
                        "moving_labels, fixed_labels)", args.pairs)
    opts = options_from_args(args)
    rows = run_batch(args.pairs, args.out_dir, register_one=register_pair, workers=args.workers,
                     shard=args.shard, scheduler=args.scheduler, threads=args.threads,
                     job_timeout_s=args.job_timeout,
                     label_mapping=args.label_mapping, progress=opts.pop("progress", True), **opts)
    n = {s: sum(r.get("status") == s for r in rows) for s in ("done", "skipped", "failed", "busy")}
    sys.stdout.write(f"{len(rows)} pairs: {n['done']} registered, {n['skipped']} already done, {n['failed']} failed"
                     + (f", {n['busy']} being registered by another process" if n["busy"] else "")
                     + f"; 'avsm status {args.out_dir}' lists every pair and writes the manifest\n")
    for r in rows:
        if r.get("status") == "failed":
            sys.stdout.write(f"failed {r['name']}: {r.get('error')}\n")
    if n["failed"] and os.environ.get("TORCHELASTIC_RUN_ID"):
        # a non-zero exit would make torchrun stop the other ranks mid-pair
        sys.stderr.write("avsm: some pairs failed (exit status 0 under torchrun so that the other ranks go on)\n")
        return 0
    return 1 if n["failed"] else 0
