"""Real cross-subject benchmark over three cohorts, all metrics from the evaluation harness.

Pair sets (``--sets``, default all three), each reported on its own in ``cohort_summary.md``:

* ``oasis``: Mindboggle OASIS-TRT-20 (``oasis-trt20/``), skull-stripped T1 with manual
  labels, one protocol across subjects.  Five disjoint pairs (01,02), (03,04), (05,06),
  (07,08), (09,10), both directions (10 rows); ``oasis01<-02`` registers moving trt02 to
  fixed trt01.  Dice is over the labels present in *both* maps (the harness alone would
  score the union, so every pair gets an explicit identity mapping of its shared labels),
  always without label 74, a stray label on 522 voxels of subject 03.  Caveat: this is the
  project's validation data, not an untouched test set (the ``fast`` preset's kernel was
  chosen on pairs of subjects 01–04, ``bench_opt_schedules.py``); it was never trained on.
* ``ixi``: the IXI **test** subjects of :func:`avsm.train.cohort.split_held_out` (16
  subjects never used for training or model selection), ``--ixi-pairs`` disjoint pairs in
  ID order (moving ``test[2k+1]``, fixed ``test[2k]``, one direction; at most 8).  Each pair
  twice: the whole head as acquired (``ixiW:<moving>-><fixed>``), and skull-stripped
  (``ixiS:...``: T1 × the DLMUSE brain mask, closed with a 1-voxel ball and holes filled,
  written to ``inputs/ixi/``).  Labels: the automatic DLMUSE parcellations, Dice over the
  labels shared by both maps; it measures agreement with an automatic segmentation.
* ``colin``: the four Colin27 ↔ MNI 2009c pairs of ``bench_real.py`` (its ``prepare()``:
  skull-stripped, 12 subcortical structures, two with a known random affine).  No
  whole-head variant: ``colin27_t1`` is whole head on ``colin27_brain``'s grid, but the only
  whole-head MNI template here (``mni2009a_t1``, ICBM 2009a *symmetric*) is a different
  image from the labelled 2009c asymmetric one and carries no labels, so no pair would be
  whole head on both sides with labels on both.

The inverse-consistency measure registers each one-direction pair backwards too (as the
harness does; ``--no-consistency`` skips it).  Non-network methods work at ``--spacing``;
the networks at their own working spacing.  ``--model`` gives the AVSM weights to every
``net*`` method.  ``voxelmorph`` (the trained weights in ``results/voxelmorph/``) only when
asked for in ``--methods``.

Usage::

    nice -n 19 python benchmarks/bench_cohort.py --data-dir ../shared/data --dry-run
    python benchmarks/bench_cohort.py --data-dir ../shared/data --sets oasis,ixi \\
        --methods identity,ants-syn,opt,net,net+opt --model runs/x/best.pt

Writes ``<out>/cohort/`` (inputs, pairs.csv, rows: an interrupted run resumes, results.csv,
summary.*) and copies the results to ``<out>/cohort_results.csv``, the overall and per-set
summaries to ``<out>/cohort_summary.md`` (per-set also as ``<out>/cohort_summary_sets.csv``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from bench_real import prepare as colin_prepare

from avsm.eval.pairs import Pair, write_pairs
from avsm.eval.runner import (
    SUMMARY_FIELDS,
    EvalConfig,
    evaluate,
    merge,
    summarize,
    summary_markdown,
)

log = logging.getLogger("bench_cohort")

SETS = ("oasis", "ixi", "colin")
DEFAULT_METHODS = "identity,ants-syn,opt,net,net+opt"
#: OASIS-TRT-20 subject pairs (both directions are evaluated)
OASIS_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10))
#: labels never scored on OASIS-TRT-20 (74: stray label of subject 03, see ../shared/data/README.md)
OASIS_EXCLUDE = frozenset({74})
MAX_IXI_PAIRS = 8
#: report groups: key -> title (pairs are assigned to a group when built)
GROUPS = {
    "oasis": "OASIS-TRT-20 (skull-stripped, manual labels)",
    "ixiW": "IXI test subjects, whole head (DLMUSE labels)",
    "ixiS": "IXI test subjects, skull-stripped (DLMUSE labels)",
    "colin": "Colin27 ↔ MNI 2009c (skull-stripped, 12 structures)",
}

_label_cache: dict[str, frozenset[int]] = {}


def label_values(path: str) -> frozenset[int]:
    """Non-zero label values of a label map (float-stored maps must hold integers)."""
    key = os.path.realpath(path)
    if key not in _label_cache:
        a = sitk.GetArrayFromImage(sitk.ReadImage(path))
        u = np.unique(a)
        r = np.rint(u)
        if not np.array_equal(u, r):
            raise SystemExit(f"{path}: non-integer label values")
        _label_cache[key] = frozenset(int(v) for v in r if v != 0)
    return _label_cache[key]


def _write_text(path: str, text: str) -> None:
    """Write ``text`` atomically unless the file already holds it."""
    if os.path.exists(path):
        with open(path) as fh:
            if fh.read() == text:
                return
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_shared_mapping(fixed_labels: str, moving_labels: str, path: str,
                         exclude: Iterable[int] = ()) -> list[int]:
    """Identity label mapping over the labels both maps hold (minus ``exclude``); returns them.

    With this file the harness scores exactly these labels (without one it scores the union).
    """
    shared = sorted((label_values(fixed_labels) & label_values(moving_labels)) - set(exclude))
    if not shared:
        raise SystemExit(f"no shared labels between {fixed_labels} and {moving_labels}")
    _write_text(path, "fixed,moving\n" + "".join(f"{v},{v}\n" for v in shared))
    return shared


def oasis_pairs(data_dir: str, inputs: str) -> list[Pair]:
    """The 10 OASIS-TRT-20 rows: 5 disjoint subject pairs, both directions."""
    d = os.path.join(os.path.abspath(data_dir), "oasis-trt20")
    os.makedirs(inputs, exist_ok=True)
    out = []
    for a, b in OASIS_PAIRS:
        img = {k: os.path.join(d, f"trt{k:02d}.nii.gz") for k in (a, b)}
        lab = {k: os.path.join(d, f"trt{k:02d}_labels.nii.gz") for k in (a, b)}
        for p in (*img.values(), *lab.values()):
            if not os.path.exists(p):
                raise SystemExit(f"missing {p}")
        mapping = os.path.join(inputs, f"shared_labels_{a:02d}_{b:02d}.csv")  # symmetric: one file per pair
        write_shared_mapping(lab[a], lab[b], mapping, OASIS_EXCLUDE)
        for f, m in ((a, b), (b, a)):
            out.append(Pair(f"oasis{f:02d}<-{m:02d}", img[m], img[f], lab[m], lab[f], mapping))
    return out


def skull_strip(t1: str, labels: str, out: str) -> None:
    """``t1`` × brain mask (``labels > 0``, closed with a 1-voxel ball, holes filled), same geometry."""
    if os.path.exists(out):
        return
    img = sitk.ReadImage(t1)
    lab = sitk.ReadImage(labels)
    mask = sitk.Cast(lab > 0, sitk.sitkUInt8)
    mask = sitk.BinaryMorphologicalClosing(mask, [1, 1, 1], sitk.sitkBall, 1)
    mask = sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)
    arr = sitk.GetArrayFromImage(img)
    keep = sitk.GetArrayFromImage(mask).astype(bool)
    res = sitk.GetImageFromArray(np.where(keep, arr, 0).astype(arr.dtype))
    res.CopyInformation(img)
    tmp = out[: -len(".nii.gz")] + ".tmp.nii.gz"
    sitk.WriteImage(res, tmp)
    os.replace(tmp, out)


def ixi_test_subjects(data_dir: str) -> list:
    """The held-out IXI test subjects (:func:`avsm.train.cohort.split_held_out`), in ID order."""
    from avsm.train.cohort import ixi_subjects, split_held_out, split_subjects

    _, held = split_subjects(ixi_subjects(os.path.join(os.path.abspath(data_dir), "ixi185")))
    _, test = split_held_out(held)
    return sorted(test, key=lambda s: s.id)


def ixi_pairs(data_dir: str, inputs: str, n_pairs: int) -> list[Pair]:
    """``n_pairs`` disjoint test-subject pairs, each whole head (``ixiW:``) and skull-stripped (``ixiS:``)."""
    test = ixi_test_subjects(data_dir)
    n_max = min(MAX_IXI_PAIRS, len(test) // 2)
    if not 1 <= n_pairs <= n_max:
        raise SystemExit(f"--ixi-pairs must be in 1..{n_max} ({len(test)} IXI test subjects)")
    os.makedirs(inputs, exist_ok=True)
    whole, stripped = [], []
    for k in range(n_pairs):
        fix, mov = test[2 * k], test[2 * k + 1]
        for s in (fix, mov):
            if not s.labels:
                raise SystemExit(f"IXI subject {s.id} has no DLMUSE labels")
        mapping = os.path.join(inputs, f"shared_labels_{mov.id}_{fix.id}.csv")
        write_shared_mapping(fix.labels, mov.labels, mapping)
        strip = {}
        for s in (fix, mov):
            strip[s.id] = os.path.join(inputs, f"{s.id}_T1_stripped.nii.gz")
            skull_strip(s.image, s.labels, strip[s.id])
        whole.append(Pair(f"ixiW:{mov.id}->{fix.id}", mov.image, fix.image, mov.labels, fix.labels, mapping))
        stripped.append(Pair(f"ixiS:{mov.id}->{fix.id}", strip[mov.id], strip[fix.id], mov.labels, fix.labels,
                             mapping))
    return whole + stripped


def build_pairs(sets: Sequence[str], data_dir: str, work: str, ixi_n: int = 4,
                seed: int = 0) -> dict[str, list[Pair]]:
    """The pairs of each requested set, by report group (``oasis``, ``ixiW``, ``ixiS``, ``colin``)."""
    inputs = os.path.join(work, "inputs")
    groups: dict[str, list[Pair]] = {}
    for s in sets:
        if s == "oasis":
            groups["oasis"] = oasis_pairs(data_dir, os.path.join(inputs, "oasis"))
        elif s == "ixi":
            ps = ixi_pairs(data_dir, os.path.join(inputs, "ixi"), ixi_n)
            groups["ixiW"] = [p for p in ps if p.pair_id.startswith("ixiW:")]
            groups["ixiS"] = [p for p in ps if p.pair_id.startswith("ixiS:")]
        elif s == "colin":
            groups["colin"] = colin_prepare(data_dir, os.path.join(inputs, "colin"), seed)
        else:
            raise SystemExit(f"unknown set {s!r} (known: {', '.join(SETS)})")
    return groups


def _n_labels(p: Pair) -> int:
    with open(p.label_mapping) as fh:  # type: ignore[arg-type]
        return sum(1 for line in fh.read().splitlines()[1:] if line.strip())


def set_summaries(groups: dict[str, list[Pair]], rows: Sequence[dict], methods: Sequence[str],
                  reference: str) -> tuple[str, list[list]]:
    """Per-group summary tables (Markdown) and rows for a CSV with a leading ``set`` column."""
    md, table = [], []
    for key, ps in groups.items():
        ids = {p.pair_id for p in ps}
        sub = [r for r in rows if r.get("pair_id") in ids]
        summ = summarize(sub, methods, reference=reference)
        nl = [_n_labels(p) for p in ps if p.label_mapping]
        nl_txt = str(nl[0]) if min(nl) == max(nl) else f"{min(nl)}–{max(nl)}"
        md.append(f"### {GROUPS[key]}\n\n{len(ps)} pair{'s' if len(ps) != 1 else ''} "
                  f"({', '.join(p.pair_id for p in ps)}); labels scored per pair: {nl_txt}.\n\n"
                  + summary_markdown(summ, reference))
        table += [[key] + [s.get(k) for k in SUMMARY_FIELDS] for s in summ]
    return "\n".join(md), table


def _csv(lines: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for line in lines:
        w.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                    (round(v, 6) if isinstance(v, float) else v) for v in line])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of oasis,ixi,colin")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="method names of avsm.baselines (add voxelmorph explicitly)")
    ap.add_argument("--label-mode", default="nearest", choices=("nearest", "label"),
                    help="how moving labels are warped for Dice (nearest: one interpolation; label: per-label "
                         "arg-max, ~100 interpolations at 1 mm for OASIS/IXI)")
    ap.add_argument("--no-hd95", action="store_true", help="skip HD95 (costly with ~100 labels at 1 mm)")
    ap.add_argument("--method-opts", default="{}",
                    help='JSON {method: {option: value}} passed to register, e.g. '
                         '\'{"net+opt@affopt": {"network_affine": "opt"}}\'')
    ap.add_argument("--model-tag", action="append", default=[], metavar="TAG=PATH",
                    help="weights for the methods named <method>@TAG (e.g. net@old), repeatable")
    ap.add_argument("--model", default=None, help="AVSM network weights for the net* methods (default: bundled)")
    ap.add_argument("--ixi-pairs", type=int, default=4, help=f"IXI test pairs (1..{MAX_IXI_PAIRS})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Colin27 random affine")
    ap.add_argument("--spacing", type=float, default=2.0, help="working spacing (mm) of non-network methods")
    ap.add_argument("--threads", type=int, default=2, help="torch / ITK threads per job")
    ap.add_argument("--no-consistency", action="store_true",
                    help="skip the inverse-consistency measure (no extra reverse registrations)")
    ap.add_argument("--in-process", action="store_true", help="run jobs in this process (no per-job peak memory)")
    ap.add_argument("--dry-run", action="store_true", help="write inputs and pairs.csv, print the pairs, stop")
    ap.add_argument("--merge-only", action="store_true", help="run nothing; merge the rows already written")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    out = os.path.abspath(args.out)
    work = os.path.join(out, "cohort")
    os.makedirs(work, exist_ok=True)
    groups = build_pairs(sets, args.data_dir, work, args.ixi_pairs, args.seed)
    pairs = [p for ps in groups.values() for p in ps]
    write_pairs(pairs, os.path.join(work, "pairs.csv"))
    for key, ps in groups.items():
        print(f"{key}: {len(ps)} pairs")
        for p in ps:
            print(f"  {p.pair_id}: {os.path.basename(p.moving)} -> {os.path.basename(p.fixed)} "
                  f"({_n_labels(p)} labels)")
    print(f"total: {len(pairs)} pairs -> {os.path.join(work, 'pairs.csv')}")
    if args.dry_run:
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    opts = {}
    if args.model:
        model = os.path.abspath(args.model)
        if not os.path.isfile(model):
            raise SystemExit(f"--model: no such file {model}")
        opts = {m: {"model": model} for m in methods if m.startswith("net")}
    for m, extra in json.loads(args.method_opts).items():
        opts.setdefault(m, {}).update(extra)
    for item in args.model_tag:
        tag, _, path = item.partition("=")
        if not os.path.isfile(path):
            raise SystemExit(f"--model-tag: no such file {path}")
        for m in methods:
            if m.endswith(f"@{tag}"):
                opts.setdefault(m, {})["model"] = os.path.abspath(path)
    cfg = EvalConfig(methods=methods, out_dir=work, spacing=args.spacing, method_opts=opts,
                     consistency=not args.no_consistency, isolate=not args.in_process, threads=args.threads,
                     hd95=not args.no_hd95, label_mode=args.label_mode)
    if not args.merge_only:
        evaluate(pairs, cfg, rank=0, world=1, progress=False)
    rows = merge(pairs, cfg)
    sets_md, sets_table = set_summaries(groups, rows, methods, cfg.reference)
    with open(os.path.join(work, "summary.md")) as fh:
        overall = fh.read()
    model_txt = args.model or "bundled"
    text = (f"## Cohort benchmark ({', '.join(sets)}; methods {', '.join(methods)}; network weights: "
            f"{model_txt}; spacing {args.spacing} mm for non-network methods)\n\n"
            f"### All pairs\n\n{overall}\n{sets_md}")
    _write_text(os.path.join(work, "summary_sets.md"), sets_md)
    shutil.copyfile(os.path.join(work, "results.csv"), os.path.join(out, "cohort_results.csv"))
    _write_text(os.path.join(out, "cohort_summary.md"), text)
    _write_text(os.path.join(out, "cohort_summary_sets.csv"), _csv([["set"] + SUMMARY_FIELDS] + sets_table))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
