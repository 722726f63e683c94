"""Batch registration of many pairs: resumable, fault-tolerant, parallel, with a manifest.

``pairs.csv`` has a header with the columns ``moving,fixed`` and optionally
``moving_labels``, ``fixed_labels`` and ``name`` (relative paths are resolved
against the CSV file's folder).  Each pair is registered into
``out_dir/<name>/`` by ``register_one(fixed, moving, pair_dir, moving_labels=...,
fixed_labels=..., **options) -> dict`` (normally
:func:`avsm.pipeline.register_pair`).

Completion and resume
    When ``register_one`` returns, every file of the pair's folder is listed with
    its size and SHA-256 in ``out_dir/<name>/done.json``, written **last** and
    atomically.  A pair is skipped on a later run only if ``done.json`` parses,
    every listed file still has its size and hash, the inputs still have the
    recorded size and hash, and the options are the same; anything else
    (including a run killed mid-pair, which leaves no ``done.json``) is redone.

Failures
    An exception in one pair is recorded (``status="failed"`` and a one-line
    ``error``) and the batch goes on.

Manifest
    ``out_dir/manifest.json`` (full records) and ``out_dir/manifest.csv`` (one
    row per pair: name, status, error, seconds, paths, scalar metrics of the
    summary) are written atomically at the end.

Parallelism
    ``workers > 1`` runs pairs in a ``ProcessPoolExecutor`` (``spawn``; torch
    threads split between workers).  Under ``torchrun`` (``WORLD_SIZE > 1``,
    ``RANK``) rank ``r`` takes ``pairs[r::world]``, writes
    ``out_dir/.manifest-rank<r>.json``, and rank 0 merges them after a barrier
    (``torch.distributed.barrier()`` when a process group is initialised,
    otherwise by waiting for the other ranks' files).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from avsm.errors import AvsmError
from avsm.io.outputs import STAGING_PREFIX, OutputTransaction, atomic_write_text

__all__ = [
    "PairSpec",
    "read_pairs",
    "run_batch",
    "verify_done",
    "DONE_NAME",
    "MANIFEST_JSON",
    "MANIFEST_CSV",
]

log = logging.getLogger(__name__)

DONE_NAME = "done.json"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
_RANK_FILE = ".manifest-rank{rank}.json"
_DONE_VERSION = 1
#: Options that do not change results (not part of the resume check).
_VOLATILE_OPTIONS = frozenset({"progress", "device"})

RegisterOne = Callable[..., Mapping[str, Any]]


@dataclass(frozen=True)
class PairSpec:
    """One row of ``pairs.csv`` with resolved paths.

    Attributes:
        name: output sub-folder name (``[A-Za-z0-9._-]``).
        moving, fixed: image paths.
        moving_labels, fixed_labels: optional label-map paths.
    """

    name: str
    moving: str
    fixed: str
    moving_labels: str | None = None
    fixed_labels: str | None = None

    @property
    def inputs(self) -> dict[str, str]:
        """``{role: path}`` of the given inputs."""
        return {k: v for k, v in (("moving", self.moving), ("fixed", self.fixed),
                                  ("moving_labels", self.moving_labels),
                                  ("fixed_labels", self.fixed_labels)) if v}


# --------------------------------------------------------------------------- pairs.csv


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "pair"


def read_pairs(pairs_csv: str | os.PathLike[str]) -> list[PairSpec]:
    """Read and check ``pairs.csv``.

    Args:
        pairs_csv: CSV with a header ``moving,fixed[,moving_labels,fixed_labels][,name]``
            (column order free, ``#`` lines ignored).  Relative paths are taken
            relative to the CSV's folder.  A missing name becomes
            ``<moving stem>_to_<fixed stem>``.

    Returns:
        The pairs in file order.

    Raises:
        AvsmError: unreadable file, missing columns, empty path, no pairs, or a
            duplicate name (one line naming the CSV).
    """
    path = os.fspath(pairs_csv)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = "".join(ln for ln in fh if not ln.lstrip().startswith("#"))
    except OSError as e:
        raise AvsmError(f"cannot read pairs file: {e.strerror or e}", path) from e
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = {"moving", "fixed"} - set(cols)
    if missing:
        raise AvsmError(f"pairs file lacks column(s) {', '.join(sorted(missing))} "
                        "(header must be moving,fixed[,moving_labels,fixed_labels][,name])", path)
    base = os.path.dirname(os.path.abspath(path))

    def res(v: str | None) -> str | None:
        v = (v or "").strip()
        if not v:
            return None
        return v if os.path.isabs(v) else os.path.normpath(os.path.join(base, v))

    pairs: list[PairSpec] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in row.items()}
        if not any(v.strip() for v in row.values()):
            continue
        moving, fixed = res(row.get("moving")), res(row.get("fixed"))
        if not moving or not fixed:
            raise AvsmError(f"row {line}: moving and fixed paths are required", path)
        name = _safe_name((row.get("name") or "").strip() or f"{_stem(moving)}_to_{_stem(fixed)}")
        if name in seen:
            raise AvsmError(f"row {line}: duplicate pair name {name!r} (also row {seen[name]}); "
                            "add a distinct 'name' column", path)
        seen[name] = line
        pairs.append(PairSpec(name, moving, fixed, res(row.get("moving_labels")), res(row.get("fixed_labels"))))
    if not pairs:
        raise AvsmError("pairs file contains no pairs", path)
    return pairs


# --------------------------------------------------------------------------- done.json


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: str) -> dict[str, Any]:
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def _output_files(pair_dir: str) -> list[str]:
    """Relative paths of the pair's outputs (hidden entries and ``done.json`` excluded)."""
    out = []
    for root, dirs, files in os.walk(pair_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(root, f), pair_dir)
            if rel != DONE_NAME:
                out.append(rel)
    return out


def _options_key(options: Mapping[str, Any]) -> str:
    kept = {k: _plain(v) for k, v in options.items() if k not in _VOLATILE_OPTIONS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """Dataclass options (settings) as dictionaries, without their volatile fields (device)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        d = dataclasses.asdict(value)
        for k in _VOLATILE_OPTIONS:
            d.pop(k, None)
        return d
    return value


def verify_done(pair: PairSpec, pair_dir: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``done.json`` record of a completed pair, or ``None`` if it must be (re)done.

    Checks: ``done.json`` parses and has this version; the inputs' paths, sizes
    and SHA-256 match; the options match (except progress/device); every
    recorded output exists with its size and SHA-256.
    """
    done = os.path.join(pair_dir, DONE_NAME)
    try:
        with open(done, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    try:
        if rec.get("version") != _DONE_VERSION or rec.get("options_key") != _options_key(options):
            return None
        inputs = rec["inputs"]
        if set(inputs) != set(pair.inputs):
            return None
        for role, p in pair.inputs.items():
            r = inputs[role]
            if r["path"] != os.path.abspath(p) or os.path.getsize(p) != r["size"] or _sha256(p) != r["sha256"]:
                return None
        files = rec["files"]
        if not files:
            return None
        for rel, r in files.items():
            fp = os.path.join(pair_dir, rel)
            if not os.path.isfile(fp) or os.path.getsize(fp) != r["size"] or _sha256(fp) != r["sha256"]:
                return None
    except (KeyError, TypeError, OSError):
        return None
    return rec


def _json_safe(obj: Any) -> Any:
    """A strict-JSON copy: unknown types become strings, NaN/Inf become ``None``."""

    def fix(x: Any) -> Any:
        if isinstance(x, float) and not (x == x and abs(x) != float("inf")):
            return None
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    return fix(json.loads(json.dumps(obj, default=str)))


def _clean_stale(pair_dir: str) -> None:
    """Remove a stale ``done.json`` and staging folders left by a killed run."""
    if not os.path.isdir(pair_dir):
        return
    try:
        os.remove(os.path.join(pair_dir, DONE_NAME))
    except FileNotFoundError:
        pass
    for entry in os.listdir(pair_dir):
        if entry.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(pair_dir, entry), ignore_errors=True)


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, AvsmError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


# --------------------------------------------------------------------------- one pair


def _check_paths(pair: PairSpec, pair_dir: str) -> None:
    """Refuse a pair whose output folder is, or contains, one of its inputs."""
    real_dir = os.path.realpath(pair_dir)
    for role, p in pair.inputs.items():
        rp = os.path.realpath(p)
        if rp == real_dir or rp.startswith(real_dir + os.sep):
            raise AvsmError(f"{role} input lies in the pair's output folder {pair_dir}; "
                            "an output could overwrite it", p)


def _record(pair: PairSpec, pair_dir: str, **kw: Any) -> dict[str, Any]:
    """A manifest record of ``pair`` (status ``failed`` until updated)."""
    rec: dict[str, Any] = {**asdict(pair), "out_dir": pair_dir, "status": "failed", "error": "",
                           "seconds": 0.0, "summary": {}, "files": {}}
    rec.update(kw)
    return rec


def _run_pair(pair: PairSpec, out_dir: str, register_one: RegisterOne,
              options: dict[str, Any]) -> dict[str, Any]:
    """Register one pair (or skip it when verified done); never raises."""
    pair_dir = os.path.join(out_dir, pair.name)
    t0 = time.perf_counter()
    rec = _record(pair, pair_dir)
    try:
        _check_paths(pair, pair_dir)
        done = verify_done(pair, pair_dir, options)
        if done is not None:
            rec.update(status="skipped", summary=done.get("summary", {}), files=done["files"],
                       seconds=done.get("seconds", 0.0))
            return rec
        _clean_stale(pair_dir)
        for role, p in pair.inputs.items():
            if not os.path.isfile(p):
                raise AvsmError("file not found" if not os.path.exists(p) else "not a file", p)
        input_recs = {role: {"path": os.path.abspath(p), **_file_record(p)} for role, p in pair.inputs.items()}
        summary = register_one(pair.fixed, pair.moving, pair_dir, moving_labels=pair.moving_labels,
                               fixed_labels=pair.fixed_labels, **options)
        # inputs must be untouched
        for role, p in pair.inputs.items():
            if _file_record(p) != {k: input_recs[role][k] for k in ("size", "sha256")}:
                raise AvsmError(f"{role} input changed during the registration", p)
        files = {rel: _file_record(os.path.join(pair_dir, rel)) for rel in _output_files(pair_dir)}
        if not files:
            raise AvsmError("registration wrote no output files", pair_dir)
        seconds = round(time.perf_counter() - t0, 3)
        done_rec = {"version": _DONE_VERSION, "name": pair.name, "inputs": input_recs,
                    "options_key": _options_key(options), "options": _json_safe(options),
                    "files": files, "summary": _json_safe(dict(summary or {})), "seconds": seconds,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # written last, atomically: its presence means every file above is complete
        atomic_write_text(os.path.join(pair_dir, DONE_NAME), json.dumps(done_rec, indent=2))
        rec.update(status="done", summary=done_rec["summary"], files=files, seconds=seconds)
    except Exception as e:  # noqa: BLE001 - per-pair failures must not stop the batch
        log.warning("pair %s failed: %s", pair.name, _one_line(e))
        rec.update(status="failed", error=_one_line(e), seconds=round(time.perf_counter() - t0, 3))
    return rec


def _worker_init(threads: int) -> None:
    """Split the CPU threads between workers (read by torch/OpenMP/MKL when first imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(max(1, threads))
    if "torch" in sys.modules:  # already imported (e.g. by a fork-like start method)
        sys.modules["torch"].set_num_threads(max(1, threads))


# --------------------------------------------------------------------------- manifest


def _scalars(prefix: str, d: Mapping[str, Any], out: dict[str, Any]) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k in ("metrics", "timings_s"):
            _scalars(key + ".", v, out)
        elif isinstance(v, (int, float, bool)) or (k == "method" and isinstance(v, str)):
            out[key] = v


def _write_manifest(out_dir: str, records: list[dict[str, Any]], inputs: Iterable[str]) -> None:
    base = ["name", "status", "error", "seconds", "moving", "fixed", "moving_labels", "fixed_labels", "out_dir"]
    rows = []
    extra: list[str] = []
    for r in records:
        row = {k: ("" if r.get(k) is None else r.get(k)) for k in base}
        metrics: dict[str, Any] = {}
        _scalars("", r.get("summary") or {}, metrics)
        for k in metrics:
            if k not in extra and k not in base:
                extra.append(k)
        row.update(metrics)
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=base + extra, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with OutputTransaction(inputs=inputs) as tx:
        for name, text in ((MANIFEST_CSV, buf.getvalue()),
                           (MANIFEST_JSON, json.dumps({"pairs": records}, indent=2, default=str))):
            with open(tx.path(os.path.join(out_dir, name)), "w", encoding="utf-8") as fh:
                fh.write(text)


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world < 1 or not 0 <= rank < world:
        raise AvsmError(f"bad torchrun environment RANK={rank} WORLD_SIZE={world}")
    return rank, world


def _dist_initialised() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001
        return False


def _run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("AVSM_BATCH_RUN_ID") or "local"


def _gather_ranks(out_dir: str, rank: int, world: int, mine: list[dict[str, Any]],
                  expected: list[list[str]], timeout_s: float) -> list[dict[str, Any]] | None:
    """Exchange per-rank records; rank 0 returns all of them (in rank order), others ``None``."""
    atomic_write_text(os.path.join(out_dir, _RANK_FILE.format(rank=rank)),
                      json.dumps({"run_id": _run_id(), "rank": rank, "world": world, "records": mine}))
    if _dist_initialised():
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return None
    deadline = time.monotonic() + timeout_s
    merged: list[dict[str, Any]] = []
    for r in range(world):
        path = os.path.join(out_dir, _RANK_FILE.format(rank=r))
        while True:
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                names = [rec["name"] for rec in data["records"]]
                if data.get("run_id") == _run_id() and data.get("world") == world and names == expected[r]:
                    merged.extend(data["records"])
                    break
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise AvsmError(f"rank {r} did not report within {timeout_s:.0f} s", path)
            time.sleep(1.0)
    for r in range(world):
        try:
            os.remove(os.path.join(out_dir, _RANK_FILE.format(rank=r)))
        except OSError:
            pass
    return merged


# --------------------------------------------------------------------------- entry point


def run_batch(
    pairs_csv: str,
    out_dir: str,
    *,
    register_one: RegisterOne,
    workers: int = 1,
    progress: bool = True,
    rank_timeout_s: float = 7 * 24 * 3600.0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Register every pair of ``pairs_csv`` into ``out_dir/<name>/``.

    Args:
        pairs_csv: the pairs file (see :func:`read_pairs`).
        out_dir: output folder (created if missing).
        register_one: ``register_one(fixed, moving, pair_dir, *, moving_labels,
            fixed_labels, **options) -> dict`` summary (e.g.
            :func:`avsm.pipeline.register_pair`); must write only inside
            ``pair_dir`` and be picklable when ``workers > 1``.
        workers: parallel worker processes (CPU); 1 runs in this process.  With a
            ``cuda`` device pairs run one at a time (under torchrun, ``device="cuda"``
            becomes ``cuda:$LOCAL_RANK``).
        progress: show the batch progress bar (with ETA); the per-pair
            ``progress`` passed to ``register_one`` is always ``False`` when
            ``register_one`` accepts it through ``options``.
        rank_timeout_s: under torchrun without a process group, how long rank 0
            waits for the other ranks' results.
        **options: passed to ``register_one`` (part of the resume check, except
            ``progress`` and ``device``).

    Returns:
        One record per pair (rank 0 of a torchrun job: every pair; other ranks:
        their own), each with ``name``, ``status`` (``done``, ``skipped``,
        ``failed``), ``error``, ``seconds``, the input paths, ``out_dir``,
        ``summary`` and ``files`` (``{relative path: {size, sha256}}``).

    Raises:
        AvsmError: bad pairs file, ``out_dir`` is an input file, or it cannot be created.
    """
    pairs = read_pairs(pairs_csv)
    out_dir = os.fspath(out_dir)
    all_inputs = [os.fspath(pairs_csv)] + [p for pr in pairs for p in pr.inputs.values()]
    for p in all_inputs:
        if os.path.exists(out_dir) and os.path.exists(p) and os.path.samefile(out_dir, p):
            raise AvsmError("output folder is an input file", out_dir)
    if os.path.isfile(out_dir):
        raise AvsmError("output folder is an existing file", out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise AvsmError(f"cannot create output folder: {e.strerror or e}", out_dir) from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise AvsmError("output folder is not writable", out_dir)

    for name in (MANIFEST_CSV, MANIFEST_JSON):
        target = os.path.join(out_dir, name)
        if any(os.path.exists(p) and os.path.samefile(target, p) for p in all_inputs if os.path.exists(target)):
            raise AvsmError("manifest would overwrite an input file", target)

    rank, world = _dist_info()
    mine = pairs[rank::world]
    settings = options.get("settings")
    device = str(settings.device if settings is not None else options.get("device", "cpu"))
    if device.startswith("cuda"):
        if world > 1 and device == "cuda" and os.environ.get("LOCAL_RANK"):
            local = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            if settings is not None:
                options = {**options, "settings": settings.replace(device=local)}
            else:
                options = {**options, "device": local}
        if workers > 1:
            log.warning("device %s: running pairs one at a time on the GPU (workers=%d ignored)", device, workers)
            workers = 1
    if "progress" in options or register_one_accepts_progress(register_one):
        options = {**options, "progress": False}
    workers = max(1, min(int(workers), len(mine) or 1))
    records: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(mine), unit="pair", desc=f"avsm batch{'' if world == 1 else f' rank {rank}'}",
               disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            for pair in mine:
                records[pair.name] = _run_pair(pair, out_dir, register_one, options)
                _tick(bar, records[pair.name])
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
                futures: dict[Future[dict[str, Any]], PairSpec] = {
                    pool.submit(_run_pair, pair, out_dir, register_one, options): pair for pair in mine}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        pair = futures[fut]
                        try:
                            rec = fut.result()
                        except Exception as e:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                            rec = _record(pair, os.path.join(out_dir, pair.name), error=_one_line(e))
                        records[pair.name] = rec
                        _tick(bar, rec)
    finally:
        bar.close()
    ordered = [records[p.name] for p in mine]
    if world > 1:
        merged = _gather_ranks(out_dir, rank, world, ordered,
                               [[p.name for p in pairs[r::world]] for r in range(world)], rank_timeout_s)
        if merged is None:
            return ordered
        by_name = {r["name"]: r for r in merged}
        ordered = [by_name[p.name] for p in pairs]
    _write_manifest(out_dir, ordered, all_inputs)
    n_fail = sum(r["status"] == "failed" for r in ordered)
    log.info("batch: %d pairs, %d failed; manifest in %s", len(ordered), n_fail, out_dir)
    return ordered


def register_one_accepts_progress(fn: RegisterOne) -> bool:
    """Whether ``fn`` has a ``progress`` keyword (so the batch can silence it)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params


def _tick(bar: Any, rec: Mapping[str, Any]) -> None:
    bar.update(1)
    failed = getattr(bar, "_avsm_failed", 0) + (rec.get("status") == "failed")
    bar._avsm_failed = failed
    if failed:
        bar.set_postfix(failed=failed)
    if rec.get("status") == "failed":
        log.info("pair %s failed: %s", rec.get("name"), rec.get("error"))

