"""The evaluation harness: every method on every pair, every metric by the same code.

Work is split into *jobs*.  A job is one method on one pair and, for the inverse-consistency
measure, the same two images registered the other way: when ``pairs.csv`` lists the reverse
pair too, both rows come from one job (no extra work); otherwise the reverse registration is
run only for the measure.

Every job is an :class:`avsm.jobs.Job` run by :func:`avsm.jobs.run_job`, the unit of work of
``avsm register --pairs`` too: its fingerprint covers the contents of every input (images,
label maps, label mapping, masks), the method and its options (spacing, ``--method-opts``)
and the metric settings, so a changed input or option recomputes that job, and only that job.
Its rows are written to ``<out_dir>/rows/<method>/<pair>/<pair>.json`` with ``done.json``
last.  A job whose registration or metrics failed keeps its rows (status ``error``) but no
``done.json``: it is tried again on the next run, and ``avsm evaluate`` exits with 1.

Jobs run on this process's shard (``--shard I/N``, SLURM array, torchrun ranks; no barrier)
in this process, in local worker processes (``--workers``; a fresh process per job with
``isolate``, which is the default of ``avsm evaluate``) or on Dask (``--scheduler``).  A
single shard then writes ``results.csv`` (one row per pair × method), ``summary.csv`` /
``summary.md`` (the paper's Table 1 layout) and ``dice_boxplot.png``; with several shards,
``avsm status OUT`` does (:func:`merge`).

Dice: the labels present in both maps, or those the label mapping maps
(:func:`avsm.labels.scored_labels`, the rule of ``avsm register`` too).

Peak memory: with ``isolate=True`` each job runs in a fresh worker process and reports its
peak resident set size (``VmHWM`` of ``/proc/self/status``; ``getrusage`` ``ru_maxrss``
elsewhere): interpreter, torch/ITK, images and both registrations.  In-process runs report
the same counter for the whole (shared) process, marked in ``memory_method``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from avsm.batch import PairSpec, safe_name
from avsm.errors import AvsmError
from avsm.eval.pairs import Pair, reverse_index
from avsm.io.outputs import atomic_write_text
from avsm.jobs import Job as UnitJob
from avsm.jobs import JobContext, collect, plan_entry, settings_key
from avsm.labels import read_label_mapping, scored_labels

__all__ = [
    "EvalConfig",
    "EvalWork",
    "Job",
    "ROW_FIELDS",
    "eval_jobs",
    "evaluate",
    "evaluate_result",
    "merge",
    "plan_jobs",
    "summarize",
    "summary_markdown",
]

log = logging.getLogger(__name__)

ROW_FIELDS = [
    "pair_id", "method", "status", "error", "moving", "fixed",
    "dice_mean", "dice_mean_affine_only", "hd95_mean", "folds", "fold_fraction", "sdlogj",
    "inv_consistency", "time_s", "time_reverse_s", "peak_rss_mb", "rss_start_mb", "memory_method", "threads",
    "n_labels", "dice_per_label", "hd95_per_label", "eval_shape", "timings",
]

SUMMARY_FIELDS = [
    "method", "n", "n_failed", "dice_mean", "dice_std", "dice_affine_only_mean", "hd95_mean", "hd95_std",
    "folds_mean", "fold_fraction_mean", "sdlogj_mean", "inv_consistency_mean", "inv_consistency_std",
    "time_mean", "time_std", "time_ratio", "peak_rss_mb_mean",
]


@dataclass
class EvalConfig:
    """Settings of an evaluation run.

    Attributes:
        methods: method names (see :mod:`avsm.baselines.base`).
        out_dir: output folder (rows, results.csv, summary.*).
        consistency: compute the inverse-consistency measure (runs the reverse
            registration when the reverse pair is not listed).
        border: voxels ignored at each face for the consistency measure.
        hd95: compute HD95 per label.
        spacing: working-grid spacing (mm) passed to every method except the
            network ones (``None``: each method's default).
        method_opts: extra keyword arguments per method name.
        isolate: run every job in a fresh worker process (true peak memory per job).
        threads: torch / ITK threads per job (``None``: the CPUs available split between
            the workers).
        reference: method whose mean time is the denominator of ``time_ratio``.
        qc: write QC figures per row (in the job folder, linked into ``<out_dir>/qc/``).
        label_mode: how moving labels are warped for Dice/HD95 (``label`` or ``nearest``).
        workers: jobs in parallel (local worker processes, or Dask workers).
        scheduler: ``local``, ``dask`` (a local Dask cluster) or a Dask scheduler address.
        job_timeout_s: a job still running after this many seconds is stopped and recorded as
            failed (local engine; ``None``: no limit).
    """

    methods: list[str]
    out_dir: str
    consistency: bool = True
    border: int = 10
    hd95: bool = True
    spacing: float | None = 2.0
    method_opts: dict[str, dict[str, Any]] = field(default_factory=dict)
    isolate: bool = True
    threads: int | None = None
    reference: str = "ants-syn"
    qc: bool = False
    label_mode: str = "label"
    workers: int = 1
    scheduler: str = "local"
    job_timeout_s: float | None = None


@dataclass(frozen=True)
class Job:
    """One method on one or two pairs (a pair and its reverse).

    Attributes:
        method: method name.
        pairs: indices of the pairs evaluated (1 or 2; with 2 they are each other's reverse).
        extra_reverse: also register ``pairs[0]`` backwards, for the consistency measure only.
    """

    method: str
    pairs: tuple[int, ...]
    extra_reverse: bool = False


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s).strip(".") or "_"


def plan_jobs(pairs: Sequence[Pair], methods: Sequence[str], consistency: bool = True) -> list[Job]:
    """All jobs, pair-major (every method on the first pair, then the second ...)."""
    rev = reverse_index(list(pairs)) if consistency else {}
    jobs: list[Job] = []
    seen: set[int] = set()
    groups: list[tuple[tuple[int, ...], bool]] = []
    for i in range(len(pairs)):
        if i in seen:
            continue
        j = rev.get(i)
        if j is not None and j not in seen:
            groups.append(((i, j), False))
            seen |= {i, j}
        else:
            groups.append(((i,), consistency))
            seen.add(i)
    for g, extra in groups:
        for m in methods:
            jobs.append(Job(m, g, extra))
    return jobs


# --------------------------------------------------------------------------- metrics


def _rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    ``VmHWM`` from ``/proc/self/status`` where available: it belongs to the
    current address space, so it starts afresh at ``exec``.  ``ru_maxrss`` does
    not on Linux (a child started by ``fork`` + ``exec`` inherits the parent's
    peak at the fork), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def evaluate_result(
    result: Any,
    pair: Pair,
    *,
    backward: Any | None = None,
    border: int = 10,
    hd95: bool = True,
    label_mode: str = "label",
) -> dict[str, Any]:
    """All metrics of one registration result (fixed = ``pair.fixed``).

    ``label_mode``: how the moving labels are warped (``label``: per-label trilinear
    arg-max; ``nearest``: one interpolation, for maps with ~100 labels at 1 mm).

    Dice/HD95 are computed on the fixed label map's grid with the warped moving labels,
    over :func:`avsm.labels.scored_labels` (labels in both maps, or the mapped ones);
    det J (folds, SDlogJ) on the fixed image's own grid; the inverse-consistency measure
    with ``backward`` (the reverse registration).

    Returns:
        A dict with the metric fields of :data:`ROW_FIELDS`.
    """
    from avsm.io.image import load_image
    from avsm.metrics.consistency import inverse_consistency
    from avsm.metrics.deformation import fold_stats, sd_log_jacobian
    from avsm.metrics.distance import array_spacing, hd95_per_label
    from avsm.metrics.overlap import dice_per_label, mean_dice

    out: dict[str, Any] = {}
    if pair.fixed_labels and pair.moving_labels:
        fl = load_image(pair.fixed_labels, label=True)
        ml = load_image(pair.moving_labels, label=True)
        mapping = read_label_mapping(pair.label_mapping) if pair.label_mapping else None
        labels = scored_labels(fl.array, ml.array, mapping)
        if mapping:
            keep = np.isin(ml.array, np.asarray(sorted(set(mapping.values())), dtype=ml.array.dtype))
            ml = ml.with_array(np.where(keep, ml.array, 0).astype(ml.array.dtype))
        if not labels:
            log.warning("%s and %s share no label: Dice is not defined (give a label mapping)",
                        pair.fixed_labels, pair.moving_labels)
        warped = result.warp(ml, onto=fl.grid, mode=label_mode)
        dice = dice_per_label(warped.array, fl.array, labels=labels, mapping=mapping)
        out["dice_per_label"] = json.dumps({str(k): round(v, 6) for k, v in dice.items()})
        out["dice_mean"] = mean_dice(dice)
        out["n_labels"] = len(labels)
        try:
            wa = result.warp(ml, onto=fl.grid, affine_only=True, mode=label_mode)
            out["dice_mean_affine_only"] = mean_dice(dice_per_label(wa.array, fl.array, labels=labels,
                                                                    mapping=mapping))
        except (NotImplementedError, AttributeError, TypeError):
            out["dice_mean_affine_only"] = float("nan")
        if hd95:
            h = hd95_per_label(warped.array, fl.array, array_spacing(fl.grid), labels=labels, mapping=mapping)
            out["hd95_per_label"] = json.dumps({str(k): round(v, 4) for k, v in h.items()})
            vals = [v for v in h.values() if v == v]
            out["hd95_mean"] = float(np.mean(vals)) if vals else float("nan")
    det = result.jacobian_determinant(result.fixed_original)
    fs = fold_stats(det)
    out["folds"] = fs.count
    out["fold_fraction"] = fs.fraction
    out["sdlogj"] = sd_log_jacobian(det)
    out["eval_shape"] = "x".join(str(s) for s in result.fixed_original.shape)
    if backward is not None:
        out["inv_consistency"] = inverse_consistency(result, backward, border=border)
    return out


# --------------------------------------------------------------------------- the job's work


def _method_kwargs(method: str, cfg: EvalConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    # learned methods run on the working grid they were trained at
    if cfg.spacing is not None and not method.startswith("net") and method != "voxelmorph":
        kw["spacing"] = cfg.spacing
    kw.update(cfg.method_opts.get(method, {}))
    return kw


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


@dataclass(frozen=True)
class EvalWork:
    """The work of one evaluation job (picklable): register, score, write one row file per pair.

    Attributes:
        method: method name.
        pairs: the pair, or the pair and its reverse.
        extra_reverse: also register ``pairs[0]`` backwards for the consistency measure.
        kwargs: the method's keyword arguments.
        border, hd95, label_mode, qc: metric settings (see :class:`EvalConfig`).
        fresh_process: the engine starts a fresh process per job (peak memory is the job's).
    """

    method: str
    pairs: tuple[PairSpec, ...]
    extra_reverse: bool
    kwargs: Mapping[str, Any]
    border: int = 10
    hd95: bool = True
    label_mode: str = "label"
    qc: bool = False
    fresh_process: bool = False

    def _run(self, fixed: Any, moving: Any) -> tuple[Any, float]:
        from avsm.baselines.base import get_method, run_method

        warm = getattr(sys.modules.get(getattr(get_method(self.method), "__module__", ""), None), "warmup", None)
        if callable(warm):
            warm()  # import heavy optional packages outside the timed region
        t0 = time.perf_counter()
        res = run_method(self.method, fixed, moving, **dict(self.kwargs))
        return res, time.perf_counter() - t0

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        from avsm.io.image import load_image

        rss0 = _rss_mb()
        isolated = ctx.isolated and self.fresh_process
        memory_method = ("peak RSS (VmHWM) of a fresh subprocess per job (both directions)" if isolated
                         else "peak RSS of the shared evaluation process (not per method)")
        ps = list(self.pairs)
        results: list[Any] = []
        times: list[float] = []
        errors: list[str | None] = []
        vols: dict[str, Any] = {}

        def vol(p: str) -> Any:
            if p not in vols:
                vols[p] = load_image(p)
            return vols[p]

        directions = [(p.fixed, p.moving) for p in ps]
        if self.extra_reverse:
            directions.append((ps[0].moving, ps[0].fixed))
        for f, m in directions:
            try:
                r, t = self._run(vol(f), vol(m))
                results.append(r)
                times.append(t)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                log.warning("%s on %s <- %s failed: %s", self.method, f, m, _error_text(e))
                results.append(None)
                times.append(float("nan"))
                errors.append(_error_text(e))
        peak = _rss_mb()
        failed: list[str] = []
        for k, p in enumerate(ps):
            row: dict[str, Any] = {"pair_id": p.name, "method": self.method, "moving": p.moving, "fixed": p.fixed,
                                   "time_s": times[k], "peak_rss_mb": peak, "rss_start_mb": rss0,
                                   "memory_method": memory_method, "threads": ctx.threads}
            back_k = (1 - k) if len(ps) == 2 else (1 if self.extra_reverse else None)
            if back_k is not None:
                row["time_reverse_s"] = times[back_k]
            if results[k] is None:
                row.update(status="error", error=errors[k])
            else:
                row["timings"] = json.dumps({a: round(float(b), 3) for a, b in results[k].timings.items()
                                             if isinstance(b, (int, float))})
                backward = results[back_k] if back_k is not None else None
                try:
                    row.update(evaluate_result(results[k], p, backward=backward, border=self.border,
                                               hd95=self.hd95, label_mode=self.label_mode))
                    row["status"] = "ok"
                    if self.qc:
                        _qc_figures(results[k], p, vol(p.fixed), vol(p.moving), ctx.dir, self.method)
                    if back_k is not None and backward is None:
                        row["error"] = f"reverse registration failed: {errors[back_k]}"
                except Exception as e:  # noqa: BLE001
                    log.warning("metrics of %s on pair %s failed: %s", self.method, p.name, _error_text(e))
                    row.update(status="error", error="metrics: " + _error_text(e))
            if row["status"] != "ok":
                failed.append(f"{p.name}: {row['error']}")
            _write_row(os.path.join(ctx.dir, f"{safe_name(p.name)}.json"), row, ctx.fingerprint)
        if failed:
            raise AvsmError(f"{self.method} failed on " + "; ".join(failed))
        return {"method": self.method, "pairs": [p.name for p in ps]}


def _qc_figures(result: Any, pair: Pair, fixed: Any, moving: Any, folder: str, method: str) -> None:
    """Pair panel and det J figure of one row (failures are logged, never fatal)."""
    try:
        from avsm.io.image import load_image
        from avsm.viz.qc import jacobian_figure, pair_figure

        fl = load_image(pair.fixed_labels, label=True) if pair.fixed_labels else None
        ml = load_image(pair.moving_labels, label=True) if pair.moving_labels else None
        if ml is not None and pair.label_mapping:
            vals = sorted(set(read_label_mapping(pair.label_mapping).values()))
            ml = ml.with_array(np.where(np.isin(ml.array, vals), ml.array, 0).astype(ml.array.dtype))
        stem = os.path.join(folder, f"{safe_name(pair.name)}")
        pair_figure(fixed, moving, result, stem + "_pair.png", fl, ml, title=f"{method}: {pair.name}")
        jacobian_figure(result, stem + "_detj.png")
    except Exception as e:  # noqa: BLE001
        log.warning("QC figures of %s on %s failed: %s", method, pair.name, _error_text(e))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def _write_row(path: str, row: Mapping[str, Any], fp: str) -> None:
    """Atomically write a row's JSON file, stamped with its job's fingerprint."""
    doc = {k: row.get(k) for k in ROW_FIELDS}
    doc["job_fingerprint"] = fp
    atomic_write_text(path, json.dumps(doc, default=_json_default))


# --------------------------------------------------------------------------- jobs


def eval_jobs(pairs: Sequence[Pair], cfg: EvalConfig) -> list[UnitJob]:
    """The :class:`avsm.jobs.Job` of every method × pair group (see :func:`plan_jobs`).

    Raises:
        AvsmError: two pairs whose names give the same folder.
    """
    seen: dict[str, str] = {}
    for p in pairs:
        f = safe_name(p.name)
        if f in seen and seen[f] != p.name:
            raise AvsmError(f"pairs {seen[f]!r} and {p.name!r} would share the output folder {f!r}")
        seen[f] = p.name
    out = []
    for ej in plan_jobs(pairs, cfg.methods, cfg.consistency):
        ps = tuple(pairs[i] for i in ej.pairs)
        kwargs = _method_kwargs(ej.method, cfg)
        inputs = tuple((f"{k}.{role}", path) for k, p in enumerate(ps) for role, path in p.inputs.items())
        key = settings_key(kind="evaluate", method=ej.method, pairs=[p.name for p in ps],
                           extra_reverse=ej.extra_reverse, kwargs=kwargs, border=cfg.border, hd95=cfg.hd95,
                           label_mode=cfg.label_mode, qc=cfg.qc, consistency=cfg.consistency)
        work = EvalWork(ej.method, ps, ej.extra_reverse, kwargs, border=cfg.border, hd95=cfg.hd95,
                        label_mode=cfg.label_mode, qc=cfg.qc,
                        fresh_process=cfg.isolate and (cfg.scheduler or "local") == "local")
        name = f"rows/{_safe(ej.method)}/{safe_name(ps[0].name)}"
        out.append(UnitJob(name, inputs, work, key, {"method": ej.method, "pairs": [p.name for p in ps]}))
    return out


# --------------------------------------------------------------------------- driver


def evaluate(
    pairs: Sequence[Pair],
    cfg: EvalConfig,
    *,
    shard: Any = None,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Run this shard's evaluation jobs; with a single shard, merge and return every row.

    Args:
        pairs: the pairs (see :func:`avsm.eval.pairs.read_pairs`).
        cfg: settings.
        shard: ``"I/N"`` or a :class:`avsm.executors.Shard` (default: ``rank``/``world``,
            else the SLURM array / torchrun environment, else everything).
        rank, world: the shard as two numbers (``evaluate(..., rank=0, world=1)``: everything).
        progress: a progress bar over this shard's jobs.

    Returns:
        The merged rows (every pair × method) with a single shard, ``None`` otherwise
        (``avsm status OUT`` merges the shards).

    Raises:
        AvsmError: bad shard, unreachable scheduler, colliding pair names.
    """
    from tqdm.auto import tqdm

    from avsm.executors import Shard, resolve_shard, run_jobs
    from avsm.jobs import STATE_DIR, new_run_id, write_plan
    from avsm.threads import resolve_threads

    if shard is None and (rank is not None or world is not None):
        shard = Shard(int(rank or 0), int(world or 1), "rank/world")
    the_shard = resolve_shard(shard)
    os.makedirs(os.path.join(cfg.out_dir, "rows"), exist_ok=True)
    jobs = eval_jobs(pairs, cfg)
    write_plan(cfg.out_dir, "evaluate", jobs, {"eval_config": asdict(cfg),
                                               "pairs": [p.to_dict() for p in pairs]})
    mine = the_shard.select(jobs)
    workers = max(1, int(cfg.workers))
    remote = cfg.scheduler not in ("local", "dask", "", None)
    threads = cfg.threads if (remote and cfg.threads is None) else resolve_threads(
        cfg.threads, min(workers, max(1, len(mine))))
    log.info("evaluate: %d of %d jobs on shard %s (%s), %d worker(s), %s threads each", len(mine), len(jobs),
             the_shard, the_shard.source, workers, threads)
    bar = tqdm(total=len(mine), desc="evaluate" + ("" if the_shard.count == 1 else f" shard {the_shard}"),
               disable=not progress, unit="job")
    try:
        records = run_jobs(mine, cfg.out_dir, scheduler=cfg.scheduler or "local", workers=workers, threads=threads,
                           recycle=cfg.isolate and (cfg.scheduler or "local") == "local", run_id=new_run_id(),
                           on_result=lambda rec: bar.update(1), job_timeout_s=cfg.job_timeout_s)
    finally:
        bar.close()
    n_failed = sum(r["status"] == "failed" for r in records.values())
    log.info("evaluate shard %s: %d jobs, %d failed", the_shard, len(records), n_failed)
    if the_shard.count > 1:
        path = os.path.join(cfg.out_dir, STATE_DIR, "shards", f"{the_shard.index}-of-{the_shard.count}.json")
        atomic_write_text(path, json.dumps({"shard": str(the_shard), "records": list(records.values())},
                                           default=str))
        return None
    return merge(pairs, cfg)


# --------------------------------------------------------------------------- merge and summary


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def collect_rows(pairs: Sequence[Pair], cfg: EvalConfig, *, verify: str = "quick"
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of every pair × method (pair-major) and the job states, from the job folders.

    A row comes from its job's folder when it carries the job's current fingerprint (a
    finished job, or the ``error`` rows of a failed one); otherwise it says why it is
    missing (``status`` ``error``, ``running`` or ``missing``).
    """
    jobs = eval_jobs(pairs, cfg)
    states = collect(cfg.out_dir, [plan_entry(j) for j in jobs], verify=verify)
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for job, st in zip(jobs, states):
        work: EvalWork = job.work  # type: ignore[assignment]
        for p in work.pairs:
            row = _read_json(os.path.join(st["out_dir"], f"{safe_name(p.name)}.json"))
            if row is None or not st.get("fingerprint") or row.get("job_fingerprint") != st["fingerprint"]:
                status = {"failed": "error"}.get(st["status"], st["status"])
                row = {"pair_id": p.name, "method": work.method, "moving": p.moving, "fixed": p.fixed,
                       "status": status if status != "done" else "error",
                       "error": st.get("error") or ("not run yet" if status == "missing" else status)}
            by_key[(p.name, work.method)] = row
    rows = [by_key[(p.name, m)] for p in pairs for m in cfg.methods if (p.name, m) in by_key]
    return rows, states


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(round(v, 6)) if abs(v) != math.inf else str(v)
    return v


def _link_qc(out_dir: str, rows: Sequence[Mapping[str, Any]], states: Sequence[Mapping[str, Any]]) -> None:
    """Gather the QC figures of finished jobs into ``<out_dir>/qc/<method>__<pair>_*.png`` (hard links)."""
    qc = os.path.join(out_dir, "qc")
    for st in states:
        folder = st["out_dir"]
        if not os.path.isdir(folder):
            continue
        method = _safe(str(st.get("method", "")))
        for f in sorted(os.listdir(folder)):
            if f.endswith(("_pair.png", "_detj.png")):
                os.makedirs(qc, exist_ok=True)
                dst = os.path.join(qc, f"{method}__{f}")
                try:
                    if os.path.exists(dst):
                        os.unlink(dst)
                    os.link(os.path.join(folder, f), dst)
                except OSError:
                    shutil.copyfile(os.path.join(folder, f), dst)


def merge(pairs: Sequence[Pair], cfg: EvalConfig, *, verify: str = "quick") -> list[dict[str, Any]]:
    """Write ``results.csv``, ``summary.csv``, ``summary.md`` and the Dice box plot; return the rows."""
    rows, states = collect_rows(pairs, cfg, verify=verify)
    lines = [ROW_FIELDS]
    for r in rows:
        lines.append([_fmt(r.get(k)) for k in ROW_FIELDS])
    atomic_write_text(os.path.join(cfg.out_dir, "results.csv"), _csv_text(lines))
    summ = summarize(rows, cfg.methods, reference=cfg.reference)
    atomic_write_text(os.path.join(cfg.out_dir, "summary.csv"),
                      _csv_text([SUMMARY_FIELDS] + [[_fmt(s.get(k)) for k in SUMMARY_FIELDS] for s in summ]))
    atomic_write_text(os.path.join(cfg.out_dir, "summary.md"), summary_markdown(summ, cfg.reference))
    if cfg.qc:
        _link_qc(cfg.out_dir, rows, states)
    try:
        from avsm.viz.qc import dice_boxplot

        dice_boxplot(os.path.join(cfg.out_dir, "results.csv"), os.path.join(cfg.out_dir, "dice_boxplot.png"),
                     methods=cfg.methods)
    except Exception as e:  # noqa: BLE001
        log.warning("Dice box plot failed: %s", _error_text(e))
    return rows


def config_from_plan(plan: Mapping[str, Any]) -> tuple[list[PairSpec], EvalConfig]:
    """The pairs and settings an ``evaluate`` plan was made with (for ``avsm status``)."""
    cfg = EvalConfig(**plan["eval_config"])
    pairs = [PairSpec(**p) for p in plan["pairs"]]
    return pairs, cfg


def _csv_text(lines: list[list[Any]]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    return buf.getvalue()


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def _ms(vals: Sequence[float]) -> tuple[float, float]:
    v = np.array([x for x in vals if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str], reference: str = "ants-syn") -> list[dict]:
    """Per-method summary (mean and std over pairs), like the paper's Table 1.

    ``time_ratio`` is the method's mean time divided by ``reference``'s mean time
    over the pairs where both succeeded (empty without the reference method).
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    ref_t = {r["pair_id"]: _num(r.get("time_s")) for r in ok if r["method"] == reference}
    out = []
    for m in methods:
        mr = [r for r in ok if r["method"] == m]
        n_fail = sum(1 for r in rows if r["method"] == m and r.get("status") != "ok")
        s: dict[str, Any] = {"method": m, "n": len(mr), "n_failed": n_fail}
        for key, name in (("dice_mean", "dice"), ("hd95_mean", "hd95"), ("inv_consistency", "inv_consistency"),
                          ("time_s", "time")):
            s[f"{name}_mean"], s[f"{name}_std"] = _ms([_num(r.get(key)) for r in mr])
        s["dice_affine_only_mean"] = _ms([_num(r.get("dice_mean_affine_only")) for r in mr])[0]
        s["folds_mean"] = _ms([_num(r.get("folds")) for r in mr])[0]
        s["fold_fraction_mean"] = _ms([_num(r.get("fold_fraction")) for r in mr])[0]
        s["sdlogj_mean"] = _ms([_num(r.get("sdlogj")) for r in mr])[0]
        s["peak_rss_mb_mean"] = _ms([_num(r.get("peak_rss_mb")) for r in mr])[0]
        common = [r for r in mr if r["pair_id"] in ref_t and np.isfinite(ref_t[r["pair_id"]])]
        if common:
            s["time_ratio"] = (float(np.mean([_num(r["time_s"]) for r in common]))
                               / float(np.mean([ref_t[r["pair_id"]] for r in common])))
        else:
            s["time_ratio"] = float("nan")
        out.append(s)
    return out


def _pm(m: float, s: float, nd: int = 3) -> str:
    if not np.isfinite(m):
        return "–"
    return f"{m:.{nd}f} ({s:.{nd}f})" if np.isfinite(s) else f"{m:.{nd}f}"


def summary_markdown(summary: Sequence[dict[str, Any]], reference: str = "ants-syn") -> str:
    """The summary as a Markdown table (mean (std) over pairs)."""
    head = ("| method | n | Dice | Dice affine only | HD95 (mm) | folds | fold % | SDlogJ "
            f"| inv. consistency ln(mm²) | time (s) | time / {reference} | peak RSS (MB) |")
    lines = [head, "|" + "---|" * 12]
    for s in summary:
        fails = f" (+{s['n_failed']} failed)" if s["n_failed"] else ""
        lines.append(
            f"| {s['method']} | {s['n']}{fails} | {_pm(s['dice_mean'], s['dice_std'])} "
            f"| {_pm(s['dice_affine_only_mean'], float('nan'))} "
            f"| {_pm(s['hd95_mean'], s['hd95_std'], 2)} "
            f"| {_pm(s['folds_mean'], float('nan'), 1)} | {_pm(100 * s['fold_fraction_mean'], float('nan'), 4)} "
            f"| {_pm(s['sdlogj_mean'], float('nan'))} "
            f"| {_pm(s['inv_consistency_mean'], s['inv_consistency_std'], 2)} "
            f"| {_pm(s['time_mean'], s['time_std'], 1)} | {_pm(s['time_ratio'], float('nan'), 2)} "
            f"| {_pm(s['peak_rss_mb_mean'], float('nan'), 0)} |"
        )
    return "\n".join(lines) + "\n"
