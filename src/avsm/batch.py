"""Batch registration of many pairs: sharded, locked, resumable, fault-tolerant, with a manifest.

``pairs.csv`` (the one format of ``avsm register --pairs`` and ``avsm evaluate``, read by
:func:`read_pairs`): a header row, then one row per pair; ``#`` lines and blank rows are
skipped; relative paths are taken from the CSV's folder.  Columns (any order):

========================  ====================================================================
``moving``, ``fixed``     the images (required); a file, or a DICOM series folder
``name``                  output sub-folder (``[A-Za-z0-9._-]``, others become ``_``; ``id`` is
                          accepted for it); default ``<moving stem>_to_<fixed stem>``; unique
``moving_labels``         label map of the moving image (warped to the fixed grid)
``fixed_labels``          label map of the fixed image (Dice in the summary)
``label_mapping``         ``fixed_label,moving_label`` CSV when the protocols differ
                          (default: ``--label-mapping``)
``fixed_mask``,           0/1 masks on the images' grids (default: ``--fixed-mask`` /
``moving_mask``           ``--moving-mask``)
========================  ====================================================================

Every pair is one :class:`avsm.jobs.Job` (see there: fingerprint of the input contents and
the options, a lock per pair, ``done.json`` written last) run by an engine of
:mod:`avsm.executors` (this process, local workers that survive a killed worker, Dask) on
this process's static shard (``--shard I/N``, a SLURM array task, a torchrun rank).  Each
pair writes into ``out_dir/<name>/``.  A failed pair is recorded with a one-line reason and
the batch goes on.

Manifest: ``out_dir/manifest.json`` (full records) and ``out_dir/manifest.csv`` (one row per
pair: name, status, error, seconds, attempts, the input paths, scalar metrics of the
summary).  A single shard writes it at its end; with several shards, ``avsm status OUT``
(:func:`batch_status`) merges what they wrote and writes it.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from avsm.errors import AvsmError
from avsm.io.outputs import OutputTransaction, atomic_write_text
from avsm.jobs import (
    DEFAULT_LOCK_TIMEOUT_S,
    DONE_NAME,
    STATE_DIR,
    Job,
    JobContext,
    collect,
    fingerprint,
    job_dir,
    new_run_id,
    read_plan,
    settings_key,
    stamp_inputs,
    write_plan,
)
from avsm.jobs import verify_done as _verify_folder

__all__ = [
    "COLUMNS",
    "DONE_NAME",
    "MANIFEST_CSV",
    "MANIFEST_JSON",
    "PairSpec",
    "RegisterWork",
    "batch_status",
    "read_pairs",
    "register_jobs",
    "run_batch",
    "verify_done",
    "write_manifest",
    "write_pairs",
]

log = logging.getLogger(__name__)

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
#: The columns of ``pairs.csv`` (``id`` is accepted for ``name``).
COLUMNS = ("moving", "fixed", "name", "moving_labels", "fixed_labels", "label_mapping", "fixed_mask",
           "moving_mask")
_PATH_COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "label_mapping", "fixed_mask", "moving_mask")

RegisterOne = Callable[..., Mapping[str, Any]]


@dataclass(frozen=True)
class PairSpec:
    """One row of ``pairs.csv`` (paths absolute after :func:`read_pairs`).

    Attributes:
        name: unique name, the output sub-folder.
        moving, fixed: image paths.
        moving_labels, fixed_labels: label-map paths or ``None``.
        label_mapping: ``fixed_label,moving_label`` CSV or ``None`` (same labels).
        fixed_mask, moving_mask: 0/1 mask paths or ``None``.
        row: line of ``pairs.csv`` it came from (0: not from a file); not compared.
    """

    name: str
    moving: str
    fixed: str
    moving_labels: str | None = None
    fixed_labels: str | None = None
    label_mapping: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None
    row: int = field(default=0, compare=False)

    @property
    def pair_id(self) -> str:
        """The name (as ``avsm evaluate`` calls it)."""
        return self.name

    @property
    def inputs(self) -> dict[str, str]:
        """``{role: path}`` of the given inputs (every one is part of the fingerprint)."""
        return {k: getattr(self, k) for k in _PATH_COLUMNS if getattr(self, k)}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable), without ``row``."""
        d = asdict(self)
        d.pop("row", None)
        return d

    def where(self, csv_path: str | None = None) -> str:
        """``"pairs.csv row N (name)"`` for messages."""
        src = f"{os.path.basename(csv_path)} " if csv_path else ""
        return f"{src}row {self.row} ({self.name})" if self.row else self.name


# --------------------------------------------------------------------------- pairs.csv


def _stem(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def safe_name(name: str) -> str:
    """``name`` as a folder name: runs of characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "pair"


def read_pairs(pairs_csv: str | os.PathLike[str], *, label_mapping: str | None = None,
               fixed_mask: str | None = None, moving_mask: str | None = None) -> list[PairSpec]:
    """Read and check ``pairs.csv`` (columns: see the module docstring and :data:`COLUMNS`).

    Args:
        pairs_csv: the file.
        label_mapping, fixed_mask, moving_mask: defaults for rows that leave these columns
            empty (``--label-mapping``, ``--fixed-mask``, ``--moving-mask``).

    Returns:
        The pairs in file order.  Missing input files are not checked here: such a pair
        fails when it runs (the others still run).

    Raises:
        AvsmError: unreadable file, missing ``moving``/``fixed`` column, a column name that
            looks like a misspelt one, both ``name`` and ``id``, an empty path, a duplicate
            name, or no pairs; one line naming the CSV (and the row).
    """
    path = os.fspath(pairs_csv)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            lines = fh.read().splitlines(keepends=True)
    except OSError as e:
        raise AvsmError(f"cannot read pairs file: {e.strerror or e}", path) from e
    except UnicodeDecodeError:
        raise AvsmError("pairs file is not a text (CSV) file", path) from None
    kept = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.reader(io.StringIO("".join(ln for _, ln in kept)))
    try:
        header = [c.strip().lower() for c in next(reader)]
    except StopIteration:
        raise AvsmError("pairs file is empty (expected a header moving,fixed,...)", path) from None
    missing = [c for c in ("moving", "fixed") if c not in header]
    if missing:
        raise AvsmError(f"pairs file lacks column(s) {', '.join(missing)} (header must name moving,fixed and "
                        f"optionally {', '.join(COLUMNS[2:])})", path)
    if "name" in header and "id" in header:
        raise AvsmError("pairs file has both 'name' and 'id' columns (they are the same; keep one)", path)
    known = set(COLUMNS) | {"id"}
    unknown = [c for c in header if c not in known]
    for c in unknown:
        close = difflib.get_close_matches(c, list(COLUMNS), n=1, cutoff=0.75)
        if close:
            raise AvsmError(f"pairs file has an unknown column {c!r}: did you mean {close[0]!r}?", path)
    if unknown:
        log.warning("%s: ignoring column(s) %s (pairs.csv columns: %s)", path, ", ".join(unknown), ", ".join(COLUMNS))
    if len(set(header)) != len(header):
        raise AvsmError("pairs file names a column twice", path)
    base = os.path.dirname(os.path.abspath(path))

    def res(v: str | None) -> str | None:
        v = (v or "").strip()
        if not v:
            return None
        v = os.path.expanduser(v)
        return v if os.path.isabs(v) else os.path.normpath(os.path.join(base, v))

    defaults = {"label_mapping": label_mapping, "fixed_mask": fixed_mask, "moving_mask": moving_mask}
    defaults = {k: (os.path.abspath(v) if v else None) for k, v in defaults.items()}
    pairs: list[PairSpec] = []
    seen: dict[str, int] = {}
    for cells in reader:
        line = kept[reader.line_num - 1][0] if reader.line_num - 1 < len(kept) else reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            raise AvsmError(f"row {line}: {len(cells)} cells but the header has {len(header)} columns", path)
        row = dict(zip(header, cells))
        moving, fixed = res(row.get("moving")), res(row.get("fixed"))
        if not moving or not fixed:
            raise AvsmError(f"row {line}: the moving and fixed paths are required", path)
        given = (row.get("name") or row.get("id") or "").strip()
        name = safe_name(given or f"{_stem(moving)}_to_{_stem(fixed)}")
        if name in seen:
            raise AvsmError(f"row {line}: duplicate pair name {name!r} (also row {seen[name]}); "
                            "give each row a distinct 'name'", path)
        seen[name] = line
        opt = {k: res(row.get(k)) or defaults.get(k) for k in ("moving_labels", "fixed_labels", "label_mapping",
                                                               "fixed_mask", "moving_mask")}
        pairs.append(PairSpec(name, moving, fixed, row=line, **opt))
    if not pairs:
        raise AvsmError("pairs file contains no pairs", path)
    return pairs


def write_pairs(pairs: Iterable[PairSpec], path: str) -> None:
    """Write ``pairs`` as a ``pairs.csv`` (absolute paths, every column)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for p in pairs:
        w.writerow([getattr(p, c) or "" for c in COLUMNS])
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- the register job


@dataclass(frozen=True)
class RegisterWork:
    """The work of one pair: ``register_one(fixed, moving, pair_dir, ...)`` (picklable).

    ``moving_labels`` and ``fixed_labels`` are always passed; ``label_mapping``,
    ``fixed_mask`` and ``moving_mask`` only when the pair has them.
    """

    register_one: RegisterOne
    pair: PairSpec
    options: Mapping[str, Any]

    def __call__(self, ctx: JobContext) -> Mapping[str, Any]:
        p = self.pair
        extra = {k: getattr(p, k) for k in ("label_mapping", "fixed_mask", "moving_mask") if getattr(p, k)}
        return self.register_one(p.fixed, p.moving, ctx.dir, moving_labels=p.moving_labels,
                                 fixed_labels=p.fixed_labels, **extra, **dict(self.options))


def _setting_files(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Files named by the settings (``--init FILE``, ``--model``): their contents count too."""
    s = options.get("settings")
    out = []
    for role, value in (("init", getattr(s, "init", None)), ("model", getattr(getattr(s, "network", None),
                                                                           "model", None))):
        if isinstance(value, str) and os.path.isfile(value):
            out.append((role, value))
    return out


def register_jobs(pairs: Sequence[PairSpec], register_one: RegisterOne, options: Mapping[str, Any]) -> list[Job]:
    """One :class:`avsm.jobs.Job` per pair (same key: the options, without device, progress, threads).

    Raises:
        AvsmError: two pairs whose names give the same folder, or a reserved name.
    """
    key = settings_key(kind="register", options=dict(options))
    extra = _setting_files(options)
    jobs, seen = [], {}
    for p in pairs:
        folder = safe_name(p.name)
        if folder in (MANIFEST_CSV, MANIFEST_JSON):
            raise AvsmError(f"pair name {p.name!r} is reserved (manifest file)")
        if folder in seen:
            raise AvsmError(f"pairs {seen[folder]!r} and {p.name!r} would share the output folder {folder!r}")
        seen[folder] = p.name
        meta = {k: v for k, v in p.to_dict().items() if k != "name"}
        jobs.append(Job(folder, tuple(p.inputs.items()) + tuple(extra), RegisterWork(register_one, p, dict(options)),
                        key, meta))
    return jobs


def verify_done(pair: PairSpec, pair_dir: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``done.json`` of ``pair`` in ``pair_dir`` if complete for these inputs and ``options``, else ``None``."""
    job = register_jobs([pair], _no_register, options)[0]
    done = _read_done(pair_dir)
    try:
        fp = fingerprint(job.key, stamp_inputs(job.inputs, (done or {}).get("inputs")))
    except AvsmError:
        return None
    return _verify_folder(pair_dir, fp)


def _no_register(*args: Any, **kwargs: Any) -> Mapping[str, Any]:  # pragma: no cover - never called
    raise RuntimeError("placeholder")


def _read_done(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, DONE_NAME), encoding="utf-8") as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- manifest


def _scalars(prefix: str, d: Mapping[str, Any], out: dict[str, Any]) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k in ("metrics", "timings_s"):
            _scalars(key + ".", v, out)
        elif isinstance(v, (int, float, bool)) or (k == "method" and isinstance(v, str)):
            out[key] = v


MANIFEST_COLUMNS = ["name", "status", "error", "seconds", "attempts", "moving", "fixed", "moving_labels",
                    "fixed_labels", "label_mapping", "fixed_mask", "moving_mask", "out_dir"]


def write_manifest(out_dir: str, records: Sequence[Mapping[str, Any]], inputs: Iterable[str] = ()) -> None:
    """Write ``manifest.csv`` and ``manifest.json`` into ``out_dir`` together (atomically)."""
    rows = []
    extra: list[str] = []
    for r in records:
        row = {k: ("" if r.get(k) is None else r.get(k)) for k in MANIFEST_COLUMNS}
        metrics: dict[str, Any] = {}
        _scalars("", r.get("summary") or {}, metrics)
        for k in metrics:
            if k not in extra and k not in MANIFEST_COLUMNS:
                extra.append(k)
        row.update(metrics)
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS + extra, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    doc = {"counts": counts, "pairs": [dict(r) for r in records]}
    with OutputTransaction(inputs=inputs) as tx:
        for name, text in ((MANIFEST_CSV, buf.getvalue()), (MANIFEST_JSON, json.dumps(doc, indent=1, default=str))):
            with open(tx.path(os.path.join(out_dir, name)), "w", encoding="utf-8") as fh:
                fh.write(text)


def batch_status(out_dir: str, *, verify: str = "quick", write: bool = True,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Merge what every shard wrote under ``out_dir`` (``avsm status``); write the manifest.

    Args:
        out_dir: the batch folder.
        verify: ``quick`` or ``full`` (re-hash every output and input).
        write: write ``manifest.csv`` / ``manifest.json``.
        overrides: records of this process's run (``done`` vs ``skipped``) by name.

    Returns:
        One record per planned pair, in plan order, ``status`` one of ``done``, ``skipped``,
        ``failed``, ``running``, ``missing``.

    Raises:
        AvsmError: no batch plan in ``out_dir``.
    """
    plan = read_plan(out_dir)
    records = collect(out_dir, plan["jobs"], verify=verify)
    if overrides:
        for i, r in enumerate(records):
            o = overrides.get(r["name"])
            if o is not None and o.get("status") in ("done", "skipped", "failed") and not (
                    r["status"] == "done" and o.get("status") == "failed"):
                records[i] = {**r, **o}
    if write:
        inputs = [p for j in plan["jobs"] for _, p in j["inputs"]] + ([plan["pairs_csv"]] if plan.get("pairs_csv")
                                                                      else [])
        write_manifest(out_dir, records, inputs)
    return records


# --------------------------------------------------------------------------- entry point


def _resolve_device(options: dict[str, Any], workers: int | None) -> tuple[dict[str, Any], int, list[str]]:
    """Device handling: ``cuda`` → one worker per visible GPU (pinned); under torchrun ``cuda:$LOCAL_RANK``."""
    from avsm.executors import gpu_devices

    settings = options.get("settings")
    device = str(settings.device if settings is not None else options.get("device", "cpu"))
    devices: list[str] = []
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("LOCAL_RANK"):
        local = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        options = ({**options, "settings": settings.replace(device=local)} if settings is not None
                   else {**options, "device": local})
        return options, max(1, workers or 1), devices
    if device == "cuda":
        devices = gpu_devices("cuda")
        n = workers or len(devices)
        if n == 1:
            devices = []  # one worker in this process: no pinning needed
        return options, max(1, n), devices
    return options, max(1, workers or 1), devices


def run_batch(
    pairs_csv: str,
    out_dir: str,
    *,
    register_one: RegisterOne,
    workers: int | None = None,
    progress: bool = True,
    shard: Any = None,
    scheduler: str = "local",
    threads: int | None = None,
    label_mapping: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    verify: str = "quick",
    max_attempts: int = 2,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    job_timeout_s: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Register this shard's pairs of ``pairs_csv`` into ``out_dir/<name>/``.

    Args:
        pairs_csv: the pairs file (:func:`read_pairs`).
        out_dir: output folder (created if missing); several processes may share it.
        register_one: ``register_one(fixed, moving, pair_dir, *, moving_labels, fixed_labels,
            [label_mapping, fixed_mask, moving_mask,] **options) -> dict`` (normally
            :func:`avsm.pipeline.register_pair`); writes only inside ``pair_dir``; picklable
            (module level) for workers and Dask.
        workers: parallel processes (``None``: 1 on CPU, one per visible GPU with
            ``device="cuda"``).
        progress: a progress bar (with ETA) over this shard's pairs; ``progress`` passed to
            ``register_one`` is ``False`` when it takes one.
        shard: ``"I/N"`` or a :class:`avsm.executors.Shard` (default: SLURM array / torchrun
            environment, else all pairs).
        scheduler: ``local``, ``dask`` or a Dask scheduler address (:func:`avsm.executors.run_jobs`).
        threads: CPU threads per pair (default: the CPUs available split between the workers).
        label_mapping, fixed_mask, moving_mask: defaults for rows without their own.
        verify: ``quick`` or ``full`` check of earlier results.
        max_attempts: attempts of a pair whose worker process died.
        lock_timeout_s: a pair lock not refreshed for this long is taken over.
        job_timeout_s: a pair still running after this many seconds is stopped (its worker
            process killed) and recorded as failed (local engine; see :func:`avsm.executors.run_jobs`).
        **options: passed to ``register_one`` (fingerprinted, except ``progress`` and ``device``).

    Returns:
        One record per pair of this shard, in file order (see :func:`avsm.jobs.run_job`;
        ``status`` ``done``, ``skipped``, ``failed`` or ``busy``), with the pair's paths.

    Raises:
        AvsmError: bad pairs file or shard, unusable ``out_dir``, unreachable scheduler.
    """
    from tqdm.auto import tqdm

    from avsm.executors import resolve_shard, run_jobs
    from avsm.threads import resolve_threads

    the_shard = resolve_shard(shard)
    pairs = read_pairs(pairs_csv, label_mapping=label_mapping, fixed_mask=fixed_mask, moving_mask=moving_mask)
    out_dir = os.fspath(out_dir)
    all_inputs = [os.fspath(pairs_csv)] + [p for pr in pairs for p in pr.inputs.values()]
    if os.path.exists(out_dir):
        for p in all_inputs:
            if os.path.exists(p) and os.path.samefile(out_dir, p):
                raise AvsmError("output folder is an input file", out_dir)
    if os.path.isfile(out_dir):
        raise AvsmError("output folder is an existing file", out_dir)
    try:
        os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    except OSError as e:
        raise AvsmError(f"cannot create output folder: {e.strerror or e}", out_dir) from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise AvsmError("output folder is not writable", out_dir)
    for name in (MANIFEST_CSV, MANIFEST_JSON):
        target = os.path.join(out_dir, name)
        if os.path.exists(target) and any(os.path.exists(p) and os.path.samefile(target, p) for p in all_inputs):
            raise AvsmError("manifest would overwrite an input file", target)

    options, n_workers, devices = _resolve_device(dict(options), workers)
    if devices and scheduler not in ("local", "", None):
        log.warning("--device cuda with --scheduler %s: Dask workers are not pinned to GPUs (use local workers, "
                    "or start one Dask worker per GPU with CUDA_VISIBLE_DEVICES set)", scheduler)
        devices = []
    if "progress" in options or register_one_accepts_progress(register_one):
        options = {**options, "progress": False}
    jobs = register_jobs(pairs, register_one, options)
    write_plan(out_dir, "register", jobs, {"pairs_csv": os.path.abspath(pairs_csv)})
    mine = the_shard.select(jobs)
    mine_names = {j.name for j in mine}
    for job, pair in zip(jobs, pairs):
        if job.name in mine_names:
            for role, p in pair.inputs.items():
                if not os.path.exists(p):
                    log.warning("%s: %s file not found: %s (this pair will fail; the others run)",
                                pair.where(pairs_csv), role, p)
    remote = scheduler not in ("local", "dask", "", None)
    n_threads = threads if (remote and threads is None) else resolve_threads(
        threads, min(n_workers, max(1, len(mine))))
    log.info("batch: %d of %d pairs on shard %s (%s), %s, %d worker(s), %s threads each", len(mine), len(jobs),
             the_shard, the_shard.source, scheduler, n_workers, n_threads or "default")
    bar = tqdm(total=len(mine), unit="pair", dynamic_ncols=True, disable=not progress,
               desc="avsm batch" + ("" if the_shard.count == 1 else f" shard {the_shard}"))
    counts = {"failed": 0}

    def tick(rec: dict[str, Any]) -> None:
        bar.update(1)
        if rec.get("status") == "failed":
            counts["failed"] += 1
            bar.set_postfix(failed=counts["failed"])
            log.info("pair %s failed: %s", rec.get("name"), rec.get("error"))

    try:
        by_name = run_jobs(mine, out_dir, scheduler=scheduler or "local", workers=n_workers, threads=n_threads,
                           devices=devices, max_attempts=max_attempts, run_id=new_run_id(), verify=verify,
                           lock_timeout_s=lock_timeout_s, on_result=tick, job_timeout_s=job_timeout_s)
    finally:
        bar.close()
    ordered = [by_name[j.name] for j in mine]
    if the_shard.count == 1:
        batch_status(out_dir, verify="quick", write=True, overrides=by_name)
    else:
        path = os.path.join(out_dir, STATE_DIR, "shards", f"{the_shard.index}-of-{the_shard.count}.json")
        atomic_write_text(path, json.dumps({"shard": str(the_shard), "records": ordered}, indent=1, default=str))
        log.info("shard %s finished; 'avsm status %s' merges the shards and writes the manifest", the_shard, out_dir)
    n = {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "failed", "busy")}
    log.info("batch shard %s: %d done, %d skipped, %d failed, %d busy elsewhere", the_shard, n["done"],
             n["skipped"], n["failed"], n["busy"])
    return ordered


def register_one_accepts_progress(fn: RegisterOne) -> bool:
    """Whether ``fn`` has a ``progress`` keyword (so the batch can silence it)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params


def job_folder(out_dir: str, name: str) -> str:
    """The output folder of pair ``name`` under ``out_dir``."""
    return job_dir(out_dir, safe_name(name))
