"""The evaluation harness: every method on every pair, every metric by the same code.

Work is split into *jobs*.  A job is one method on one pair and, for the
inverse-consistency measure, the same two images registered the other way:
when ``pairs.csv`` lists the reverse pair too, both rows come from one job (no
extra work); otherwise the reverse registration is run only for the measure.

Each finished row is written at once to ``<out_dir>/rows/<method>__<pair>.json``
(atomically), so an interrupted run resumes where it stopped and never
recomputes a finished row.  With ``WORLD_SIZE`` > 1 (e.g. under ``torchrun``)
rank ``r`` takes jobs ``r::WORLD_SIZE`` and rank 0 merges once every row
exists (a gloo barrier when ``MASTER_ADDR`` is set, else by watching the row
files).  The merge writes ``results.csv`` (one row per pair × method) and
``summary.csv`` / ``summary.md`` (the paper's Table 1 layout).

Peak memory: with ``isolate=True`` (the default of ``avsm evaluate``) each job
runs in a fresh Python subprocess and reports its peak resident set size
(``VmHWM`` of ``/proc/self/status``; ``getrusage`` ``ru_maxrss`` elsewhere):
interpreter, torch/ITK, images and both registrations; metrics are computed
after the reading.  This sees torch's and ITK's native allocations, unlike
``tracemalloc``.  (``ru_maxrss`` itself is not used on Linux because a child
inherits its parent's peak at ``fork``.)  In-process runs report the same
counter for the whole (shared) process, marked in ``memory_method``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from avsm.errors import AvsmError
from avsm.eval.pairs import Pair, read_label_mapping, reverse_index
from avsm.io.outputs import atomic_write_text

__all__ = [
    "EvalConfig",
    "Job",
    "ROW_FIELDS",
    "plan_jobs",
    "row_path",
    "run_job",
    "evaluate",
    "merge",
    "summarize",
    "summary_markdown",
    "evaluate_result",
]

log = logging.getLogger(__name__)

ROW_FIELDS = [
    "pair_id", "method", "status", "error", "moving", "fixed",
    "dice_mean", "dice_mean_affine_only", "hd95_mean", "folds", "fold_fraction", "sdlogj",
    "inv_consistency", "time_s", "time_reverse_s", "peak_rss_mb", "rss_start_mb", "memory_method",
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
        isolate: run every job in a fresh subprocess (true peak memory).
        threads: torch / ITK threads per job.
        reference: method whose mean time is the denominator of ``time_ratio``.
        qc: write QC figures per row to ``<out_dir>/qc/`` (pair panel and det J map).
        label_mode: how moving labels are warped for Dice/HD95 (``label`` or ``nearest``).
    """

    methods: list[str]
    out_dir: str
    consistency: bool = True
    border: int = 10
    hd95: bool = True
    spacing: float | None = 2.0
    method_opts: dict[str, dict[str, Any]] = field(default_factory=dict)
    isolate: bool = True
    threads: int = 2
    reference: str = "ants-syn"
    qc: bool = False
    label_mode: str = "label"


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
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


def row_path(out_dir: str, method: str, pair_id: str) -> str:
    """Where the row of ``method`` on pair ``pair_id`` is stored."""
    return os.path.join(out_dir, "rows", f"{_safe(method)}__{_safe(pair_id)}.json")


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


def _job_done(job: Job, pairs: Sequence[Pair], out_dir: str) -> bool:
    return all(os.path.exists(row_path(out_dir, job.method, pairs[i].pair_id)) for i in job.pairs)


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

    Dice/HD95 are computed on the fixed label map's grid with the warped moving
    labels; det J (folds, SDlogJ) on the fixed image's own grid; the
    inverse-consistency measure with ``backward`` (the reverse registration).

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
        if mapping:
            labels = sorted(mapping)
            keep = np.isin(ml.array, np.asarray(sorted(set(mapping.values())), dtype=ml.array.dtype))
            ml = ml.with_array(np.where(keep, ml.array, 0).astype(ml.array.dtype))
        else:
            labels = sorted(int(v) for v in np.union1d(np.unique(fl.array), np.unique(ml.array)) if v != 0)
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


# --------------------------------------------------------------------------- jobs


def _method_kwargs(method: str, cfg: EvalConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    # learned methods run on the working grid they were trained at
    if cfg.spacing is not None and not method.startswith("net") and method != "voxelmorph":
        kw["spacing"] = cfg.spacing
    kw.update(cfg.method_opts.get(method, {}))
    return kw


def _run(method: str, fixed: Any, moving: Any, cfg: EvalConfig) -> tuple[Any, float]:
    from avsm.baselines.base import get_method, run_method

    warm = getattr(sys.modules.get(getattr(get_method(method), "__module__", ""), None), "warmup", None)
    if callable(warm):
        warm()  # import heavy optional packages outside the timed region
    t0 = time.perf_counter()
    res = run_method(method, fixed, moving, **_method_kwargs(method, cfg))
    return res, time.perf_counter() - t0


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


def run_job(job: Job, pairs: Sequence[Pair], cfg: EvalConfig, *, memory_method: str | None = None) -> list[dict]:
    """Run one job in this process and write its rows (also returned).

    Rows already written are left as they are (when a job reruns for its other row).
    """
    from avsm.io.image import load_image

    rss0 = _rss_mb()
    memory_method = memory_method or "peak RSS of the shared evaluation process (not per method)"
    ps = [pairs[i] for i in job.pairs]
    results: list[Any] = []
    times: list[float] = []
    errors: list[str | None] = []
    vols: dict[str, Any] = {}

    def vol(p: str) -> Any:
        if p not in vols:
            vols[p] = load_image(p)
        return vols[p]

    directions = [(p.fixed, p.moving) for p in ps]
    if job.extra_reverse:
        directions.append((ps[0].moving, ps[0].fixed))
    for f, m in directions:
        try:
            r, t = _run(job.method, vol(f), vol(m), cfg)
            results.append(r)
            times.append(t)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - recorded in the row
            log.warning("%s on %s <- %s failed: %s", job.method, f, m, _error_text(e))
            results.append(None)
            times.append(float("nan"))
            errors.append(_error_text(e))
    peak = _rss_mb()
    rows = []
    for k, p in enumerate(ps):
        if os.path.exists(row_path(cfg.out_dir, job.method, p.pair_id)):
            continue  # finished earlier (the job was rerun for its other row): never recompute
        row: dict[str, Any] = {"pair_id": p.pair_id, "method": job.method, "moving": p.moving, "fixed": p.fixed,
                               "time_s": times[k], "peak_rss_mb": peak, "rss_start_mb": rss0,
                               "memory_method": memory_method}
        back_k = (1 - k) if len(ps) == 2 else (1 if job.extra_reverse else None)
        if back_k is not None:
            row["time_reverse_s"] = times[back_k]
        if results[k] is None:
            row.update(status="error", error=errors[k])
        else:
            row["timings"] = json.dumps({a: round(float(b), 3) for a, b in results[k].timings.items()
                                         if isinstance(b, (int, float))})
            backward = results[back_k] if back_k is not None else None
            try:
                row.update(evaluate_result(results[k], p, backward=backward, border=cfg.border, hd95=cfg.hd95,
                                           label_mode=cfg.label_mode))
                row["status"] = "ok"
                if cfg.qc:
                    _qc_figures(results[k], p, vol(p.fixed), vol(p.moving), cfg.out_dir, job.method)
                if back_k is not None and backward is None:
                    row["error"] = f"reverse registration failed: {errors[back_k]}"
            except Exception as e:  # noqa: BLE001
                log.warning("metrics of %s on pair %s failed: %s", job.method, p.pair_id, _error_text(e))
                row.update(status="error", error="metrics: " + _error_text(e))
        write_row(cfg.out_dir, row)
        rows.append(row)
    return rows


def _qc_figures(result: Any, pair: Pair, fixed: Any, moving: Any, out_dir: str, method: str) -> None:
    """Pair panel and det J figure of one row (failures are logged, never fatal)."""
    try:
        from avsm.io.image import load_image
        from avsm.viz.qc import jacobian_figure, pair_figure

        fl = load_image(pair.fixed_labels, label=True) if pair.fixed_labels else None
        ml = load_image(pair.moving_labels, label=True) if pair.moving_labels else None
        if ml is not None and pair.label_mapping:
            vals = sorted(set(read_label_mapping(pair.label_mapping).values()))
            ml = ml.with_array(np.where(np.isin(ml.array, vals), ml.array, 0).astype(ml.array.dtype))
        stem = os.path.join(out_dir, "qc", f"{_safe(method)}__{_safe(pair.pair_id)}")
        pair_figure(fixed, moving, result, stem + "_pair.png", fl, ml, title=f"{method}: {pair.pair_id}")
        jacobian_figure(result, stem + "_detj.png")
    except Exception as e:  # noqa: BLE001
        log.warning("QC figures of %s on %s failed: %s", method, pair.pair_id, _error_text(e))


def write_row(out_dir: str, row: dict[str, Any]) -> None:
    """Atomically write a row's JSON file."""
    path = row_path(out_dir, row["method"], row["pair_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps({k: row.get(k) for k in ROW_FIELDS}, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def _run_isolated(job: Job, pairs: Sequence[Pair], cfg: EvalConfig) -> None:
    """Run a job in a fresh subprocess (``python -m avsm.eval.worker``)."""
    import avsm

    os.makedirs(cfg.out_dir, exist_ok=True)
    spec = {"job": asdict(job), "pairs": [p.to_dict() for p in pairs], "config": asdict(cfg)}
    fd, spec_path = tempfile.mkstemp(prefix="job-", suffix=".json", dir=cfg.out_dir)
    with os.fdopen(fd, "w") as fh:
        json.dump(spec, fh)
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(avsm.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(cfg.threads))
    env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    try:
        proc = subprocess.run([sys.executable, "-m", "avsm.eval.worker", spec_path], env=env,
                              capture_output=True, text=True, encoding="utf-8", errors="replace",
                              check=False)
    finally:
        os.unlink(spec_path)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        msg = f"worker exited with code {proc.returncode}: {' | '.join(tail)}"
        log.warning("%s: %s", job.method, msg)
        for i in job.pairs:
            p = pairs[i]
            if not os.path.exists(row_path(cfg.out_dir, job.method, p.pair_id)):
                write_row(cfg.out_dir, {"pair_id": p.pair_id, "method": job.method, "moving": p.moving,
                                        "fixed": p.fixed, "status": "error", "error": msg[:500]})


# --------------------------------------------------------------------------- driver


def _rank_world() -> tuple[int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise AvsmError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world


def evaluate(
    pairs: Sequence[Pair],
    cfg: EvalConfig,
    *,
    rank: int | None = None,
    world: int | None = None,
    wait_timeout: float = 7 * 24 * 3600.0,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Run (this rank's share of) the evaluation, then merge on rank 0.

    Args:
        pairs: the pairs (see :func:`avsm.eval.pairs.read_pairs`).
        cfg: settings.
        rank, world: shard (default from ``RANK`` / ``WORLD_SIZE``).
        wait_timeout: seconds rank 0 waits for the other ranks' rows.
        progress: a tqdm bar over this rank's jobs.

    Returns:
        The merged rows on rank 0, ``None`` on other ranks.
    """
    if rank is None or world is None:
        rank, world = _rank_world()
    os.makedirs(os.path.join(cfg.out_dir, "rows"), exist_ok=True)
    jobs = plan_jobs(pairs, cfg.methods, cfg.consistency)
    mine = jobs[rank::world]
    todo = [j for j in mine if not _job_done(j, pairs, cfg.out_dir)]
    log.info("rank %d/%d: %d jobs, %d already done", rank, world, len(mine), len(mine) - len(todo))
    if not cfg.isolate:
        import torch

        torch.set_num_threads(cfg.threads)
    from tqdm import tqdm

    for job in tqdm(todo, desc=f"evaluate[rank {rank}]", disable=not progress):
        if cfg.isolate:
            _run_isolated(job, pairs, cfg)
        else:
            run_job(job, pairs, cfg)
    dist = _maybe_barrier(world)
    if rank != 0:
        return None
    if not dist:
        _wait_for_rows(jobs, pairs, cfg.out_dir, wait_timeout)
    return merge(pairs, cfg)


def _maybe_barrier(world: int) -> bool:
    """A gloo barrier when launched by torchrun (``MASTER_ADDR`` set); returns whether it ran."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import datetime

    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()
    if own:
        dist.destroy_process_group()
    return True


def _wait_for_rows(jobs: Sequence[Job], pairs: Sequence[Pair], out_dir: str, timeout: float) -> None:
    t0 = time.monotonic()
    while not all(_job_done(j, pairs, out_dir) for j in jobs):
        if time.monotonic() - t0 > timeout:
            raise AvsmError(f"timed out waiting for other ranks' rows in {out_dir}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- merge and summary


def _read_rows(pairs: Sequence[Pair], methods: Sequence[str], out_dir: str) -> list[dict[str, Any]]:
    rows = []
    for p in pairs:
        for m in methods:
            path = row_path(out_dir, m, p.pair_id)
            if os.path.exists(path):
                with open(path) as fh:
                    rows.append(json.load(fh))
    return rows


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(round(v, 6)) if abs(v) != math.inf else str(v)
    return v


def merge(pairs: Sequence[Pair], cfg: EvalConfig) -> list[dict[str, Any]]:
    """Write ``results.csv``, ``summary.csv`` and ``summary.md`` from the row files; return the rows."""
    rows = _read_rows(pairs, cfg.methods, cfg.out_dir)
    lines = [ROW_FIELDS]
    for r in rows:
        lines.append([_fmt(r.get(k)) for k in ROW_FIELDS])
    atomic_write_text(os.path.join(cfg.out_dir, "results.csv"), _csv_text(lines))
    summ = summarize(rows, cfg.methods, reference=cfg.reference)
    atomic_write_text(os.path.join(cfg.out_dir, "summary.csv"),
                      _csv_text([SUMMARY_FIELDS] + [[_fmt(s.get(k)) for k in SUMMARY_FIELDS] for s in summ]))
    atomic_write_text(os.path.join(cfg.out_dir, "summary.md"), summary_markdown(summ, cfg.reference))
    try:
        from avsm.viz.qc import dice_boxplot

        dice_boxplot(os.path.join(cfg.out_dir, "results.csv"), os.path.join(cfg.out_dir, "dice_boxplot.png"),
                     methods=cfg.methods)
    except Exception as e:  # noqa: BLE001
        log.warning("Dice box plot failed: %s", _error_text(e))
    return rows


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
