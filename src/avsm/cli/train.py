"""``avsm train``: train the AVSM networks (stage ``affine`` then stage ``vsvf``).

Examples::

    avsm train --data prepared/ --out runs/affine --stage affine --epochs 30 --single-step-epochs 10
    avsm train --data prepared/ --out runs/vsvf --stage vsvf --init-from runs/affine/best.pt --epochs 20
    avsm train --export runs/vsvf/best.pt --to src/avsm/data/weights/avsm_brain.pt
    torchrun --nproc_per_node 2 -m avsm.cli.main train ...   # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    """Register the ``train`` sub-command."""
    p = subparsers.add_parser("train", help="train the AVSM networks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared folder (scripts/prepare_training_data.py)")
    p.add_argument("--out", default="runs/avsm", help="output folder")
    p.add_argument("--stage", choices=("affine", "vsvf"), default="affine")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters-per-epoch", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-halve-every", type=int, default=60, help="epochs between lr halvings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    p.add_argument("--no-symmetric", action="store_true", help="one direction only (no consistency terms)")
    p.add_argument("--single-step-epochs", type=int, default=0, help="affine stage: single-step epochs first")
    p.add_argument("--init-from", help="start from this checkpoint/weights (vsvf stage: the affine result)")
    p.add_argument("--resume", help="resume exactly from this last.pt")
    p.add_argument("--val-per-volume", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    p.add_argument("--device", default="cpu")
    from avsm.threads import add_threads_argument

    add_threads_argument(p, per=" per process (under torchrun: the CPUs split between the local ranks)")
    p.add_argument("--model", default="{}", help="JSON of AVSMConfig fields for a fresh model")
    p.add_argument("--augmentation", default="{}", help="JSON of AugmentConfig fields")
    p.add_argument("--sources", default="",
                   help="mixture of the real cohort and synthesised pairs, e.g. 'ixi=0.6,synthseg=0.3,synth-ixi=0.1'; "
                        "'ixi-aligned=1' or 'distill=1': pairs pre-aligned by template affines (vsvf stage) "
                        "(avsm.train.mixture; replaces --data, validation on held-out IXI pairs)")
    p.add_argument("--shared", default="../shared/data", help="shared data folder (ixi185/, synthseg-label-maps/)")
    p.add_argument("--spacing", type=float, default=4.2, help="working spacing (mm) of the cohort sources")
    p.add_argument("--cache", default="runs/cache", help="folder for the prepared cohort")
    p.add_argument("--subjects-limit", type=int, default=0, help="use the first N IXI training subjects (0: all)")
    p.add_argument("--val-pairs", type=int, default=12, help="held-out IXI validation pairs")
    p.add_argument("--pose", default="{}", help="JSON of PoseConfig fields (random pose before the initialisation)")
    p.add_argument("--synth", default="{}", help="JSON of SynthConfig fields")
    p.add_argument("--dice-weight", type=float, default=0.0, help="weight of the Dice term on warped labels")
    p.add_argument("--dice-labels", type=int, default=16, help="labels per pair in the Dice term")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="weight of the supervised map term against vSVF-opt's targets (source 'distill')")
    p.add_argument("--distill-pairs", type=int, default=64,
                   help="fixed pre-aligned training pairs of the 'distill' source (targets cached in --cache)")
    p.add_argument("--export", metavar="CKPT", help="only export CKPT as a slim weights file (--to)")
    p.add_argument("--to", help="destination of --export")
    p.add_argument("--override", default="{}", help="--export: JSON of inference config fields to set")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``avsm train``."""
    from avsm.errors import AvsmError
    from avsm.train.trainer import TrainConfig, export_weights, train

    if args.export:
        if not args.to:
            raise AvsmError("--export needs --to")
        try:
            overrides = json.loads(args.override)
        except json.JSONDecodeError as e:
            raise AvsmError(f"--override must be a JSON object: {e}") from e
        dest = export_weights(args.export, args.to, overrides=overrides)
        log.info("wrote %s", dest)
        return 0
    sources = parse_sources(args.sources)
    if not args.data and not sources:
        raise AvsmError("--data or --sources is required")
    try:
        model_cfg = json.loads(args.model)
        aug_cfg = json.loads(args.augmentation)
        pose_cfg = json.loads(args.pose)
        synth_cfg = json.loads(args.synth)
    except json.JSONDecodeError as e:
        raise AvsmError(f"--model/--augmentation/--pose/--synth must be JSON objects: {e}") from e
    if sources:
        model_cfg.setdefault("working_spacing", args.spacing)
    cfg = TrainConfig(
        data=args.data, out=args.out, stage=args.stage, epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, lr=args.lr,
        lr_halve_every=args.lr_halve_every, seed=args.seed, augment=not args.no_augment,
        symmetric=not args.no_symmetric, single_step_epochs=args.single_step_epochs,
        init_from=args.init_from, resume=args.resume, val_per_volume=args.val_per_volume,
        max_minutes=args.max_minutes, device=args.device,
        threads=_threads(args.threads),
        model=model_cfg, augmentation=aug_cfg, sources=sources, shared=args.shared, spacing=args.spacing,
        cache=args.cache, subjects_limit=args.subjects_limit, val_pairs=args.val_pairs, pose=pose_cfg,
        synth=synth_cfg, dice_weight=args.dice_weight, dice_labels=args.dice_labels,
        distill_weight=args.distill_weight, distill_pairs=args.distill_pairs,
    )
    train(cfg)
    return 0


def parse_sources(text: str) -> dict[str, float]:
    """``'ixi=0.6,synthseg=0.4'`` → ``{"ixi": 0.6, "synthseg": 0.4}`` (empty text: ``{}``).

    Raises:
        AvsmError: an item without ``=`` or a weight that is not a number.
    """
    from avsm.errors import AvsmError

    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, w = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(w)
        except ValueError as e:
            raise AvsmError(f"--sources: {item!r} is not NAME=WEIGHT") from e
    return out


def _threads(threads: int | None) -> int:
    """``--threads``, else the CPUs available split between torchrun's local ranks (``LOCAL_WORLD_SIZE``)."""
    import os

    from avsm.threads import resolve_threads

    return resolve_threads(threads)  # splits between torchrun's local ranks itself
