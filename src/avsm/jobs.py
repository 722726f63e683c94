"""The unit of batch work: one job run idempotently into its own folder, with a fingerprint and a lock.

A :class:`Job` is a name (its folder under a batch root), its input files, a key (a hash of the
settings that change its results) and a picklable ``work(ctx)`` callable that writes the
outputs into ``ctx.dir``.  :func:`run_job` is the one function every engine calls
(``avsm register --pairs`` and ``avsm evaluate``; in this process, in a local worker, on a
Dask worker, in any SLURM array task):

1. **Fingerprint**: SHA-256 over the key and the SHA-256 of every input.  A job is done when
   ``ROOT/<name>/done.json`` carries this fingerprint and every output it lists still has its
   size and content.  Hashes are reused while a file keeps its size and modification time
   (as ``make``/``rsync`` do), so a resumed 10 000-pair batch does not re-read every image;
   ``verify="full"`` re-hashes everything.
2. **Lock** (:class:`JobLock`): ``ROOT/.avsm-batch/locks/<name>.lock`` is created with
   ``O_CREAT | O_EXCL`` and holds host, pid, process start time, run id and time; a thread
   refreshes its time stamp every minute.  A second process finds it and moves on (status
   ``busy``), so two processes never work on the same job.  A lock is taken over when its
   holder is a dead process on this host, when it was left by an earlier attempt of the same
   run (a Dask worker that died elsewhere), or when it has not been refreshed for
   ``lock_timeout_s`` (another host; default 30 min).
3. **Atomic commit**: outputs are written (by ``work``, atomically file by file), then
   ``done.json`` is written last and atomically.  A killed run, a full disk or an exception
   leaves no ``done.json``, so nothing partial ever looks done; outputs of an earlier version
   of the job stay until the new ones replace them.
4. **Failures** are recorded in ``ROOT/.avsm-batch/failed/<name>.json`` (fingerprint, the one-line
   reason, attempts) and never raise.

``ROOT/.avsm-batch/plan.json`` lists the jobs of the latest run; :func:`collect` reads it with the
job folders, locks and failure records into one state per job (``done``, ``failed``,
``running``, ``missing``): that is what ``avsm status`` prints and merges into the manifest.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from avsm.errors import AvsmError
from avsm.io.outputs import STAGING_PREFIX, atomic_write_text

__all__ = [
    "DONE_NAME",
    "STATE_DIR",
    "Job",
    "JobContext",
    "JobLock",
    "collect",
    "failed_record",
    "fingerprint",
    "job_dir",
    "lock_attempt",
    "new_run_id",
    "one_line",
    "plain_options",
    "plan_entry",
    "read_plan",
    "record_failure",
    "run_job",
    "settings_key",
    "skipped_record",
    "stamp_inputs",
    "verify_done",
    "write_plan",
]

log = logging.getLogger(__name__)

DONE_NAME = "done.json"
STATE_DIR = ".avsm-batch"
DONE_VERSION = 2
PLAN_VERSION = 1
#: Options that do not change results: left out of the fingerprint.
VOLATILE_OPTIONS = frozenset({"progress", "device", "threads"})
#: Seconds between lock refreshes, and without one before a lock of another host is taken over.
HEARTBEAT_S = 60.0
DEFAULT_LOCK_TIMEOUT_S = 1800.0


def one_line(e: BaseException) -> str:
    """An exception as one line (``AvsmError`` as is, others with their type), at most 500 characters."""
    if isinstance(e, AvsmError):
        text = str(e)
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


def new_run_id() -> str:
    """A fresh run id (locks left by an earlier attempt of the same run may be taken over)."""
    return uuid.uuid4().hex[:16]


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobContext:
    """What ``work`` gets.

    Attributes:
        job: the job.
        dir: its output folder (created; outputs go here).
        fingerprint: the job's fingerprint (stamp it on outputs that must match it).
        threads: CPU threads set for this job (``None``: not set by the engine).
        attempt: 1 for the first attempt, 2 after a worker died, ...
        isolated: the job runs in a process started for this batch (not the caller's).
    """

    job: Job
    dir: str
    fingerprint: str
    threads: int | None
    attempt: int
    isolated: bool


@dataclass(frozen=True, eq=False)
class Job:
    """One unit of work.

    Attributes:
        name: folder of its outputs under the batch root (``/``-separated parts of
            ``[A-Za-z0-9._+-]``, not starting with ``.``).
        inputs: ``(role, path)`` of every input file (or DICOM folder); their contents are
            part of the fingerprint, and no output may be written among them.
        work: ``work(ctx: JobContext) -> Mapping`` (a summary); must be picklable for worker
            processes and Dask, write only inside ``ctx.dir``, and raise on failure.
        key: hash of the settings that change the results (see :func:`settings_key`).
        meta: extra JSON fields copied into the job's records (e.g. the pair's paths).
    """

    name: str
    inputs: tuple[tuple[str, str], ...]
    work: Callable[[JobContext], Mapping[str, Any]]
    key: str
    meta: Mapping[str, Any] = field(default_factory=dict)


_NAME_PART = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")


def job_dir(root: str, name: str) -> str:
    """The output folder of job ``name`` under ``root``.

    Raises:
        AvsmError: a name that is not a relative path of safe parts.
    """
    parts = name.split("/")
    if not parts or not all(_NAME_PART.match(p) for p in parts):
        raise AvsmError(f"invalid job name {name!r} (use letters, digits, '.', '_', '+', '-')")
    return os.path.join(root, *parts)


def lock_attempt(root: str, name: str) -> int | None:
    """The attempt number in job ``name``'s lock file (left behind by a dead attempt), or ``None``."""
    info = _read_json(_state_path(root, "locks", name, ".lock"))
    try:
        return int(info["attempt"]) if info else None
    except (KeyError, TypeError, ValueError):
        return None


def _state_key(name: str) -> str:
    """A flat file name for job ``name``, one-to-one: ``/`` (and ``+``) are %-escaped and ``%``
    never occurs in a valid name, so ``a/b`` and ``a__b`` get different locks and records."""
    return urllib.parse.quote(name, safe="")


def _state_path(root: str, kind: str, name: str, ext: str) -> str:
    return os.path.join(root, STATE_DIR, kind, _state_key(name) + ext)


def plain_options(value: Any) -> Any:
    """Options as plain JSON data: dataclasses as dicts, volatile fields (device, progress, threads) removed."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): plain_options(v) for k, v in value.items() if k not in VOLATILE_OPTIONS}
    if isinstance(value, (list, tuple)):
        return [plain_options(v) for v in value]
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def settings_key(**parts: Any) -> str:
    """SHA-256 of ``parts`` as plain data (see :func:`plain_options`): a :attr:`Job.key`."""
    return hashlib.sha256(json.dumps(plain_options(parts), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- hashing


_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}
_HASH_CACHE_LOCK = threading.Lock()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_files(path: str) -> list[str]:
    out = []
    for base, dirs, files in os.walk(path):
        dirs[:] = sorted(dirs)
        out.extend(os.path.join(base, f) for f in sorted(files))
    return out


def _stat_stamp(path: str) -> dict[str, Any]:
    """Size and modification time (for a folder: of its files, summed / latest)."""
    if os.path.isdir(path):
        files = _dir_files(path)
        sts = [os.stat(f) for f in files]
        return {"size": sum(s.st_size for s in sts), "mtime_ns": max((s.st_mtime_ns for s in sts), default=0),
                "n_files": len(files)}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _content_hash(path: str, full: bool) -> str:
    if os.path.isdir(path):
        h = hashlib.sha256()
        for f in _dir_files(path):
            h.update(os.path.relpath(f, path).encode() + b"\0" + _content_hash(f, full).encode())
        return h.hexdigest()
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if not full:
        with _HASH_CACHE_LOCK:
            hit = _HASH_CACHE.get(key)
        if hit is not None:
            return hit
    digest = _sha256_file(path)
    with _HASH_CACHE_LOCK:
        if len(_HASH_CACHE) > 200_000:
            _HASH_CACHE.clear()
        _HASH_CACHE[key] = digest
    return digest


def stamp_inputs(inputs: Iterable[tuple[str, str]], hint: Mapping[str, Any] | None = None,
                 full: bool = False) -> dict[str, dict[str, Any]]:
    """``{role: {path, size, mtime_ns, sha256}}`` of the inputs.

    A SHA-256 in ``hint`` (an earlier stamp) is reused when the file still has the same path,
    size and modification time, unless ``full``.

    Raises:
        AvsmError: an input is missing (one line naming it and its role).
    """
    out: dict[str, dict[str, Any]] = {}
    for role, path in inputs:
        try:
            st = _stat_stamp(path)
        except FileNotFoundError:
            raise AvsmError(f"{role} file not found", path) from None
        except OSError as e:
            raise AvsmError(f"cannot read {role}: {e.strerror or e}", path) from e
        old = (hint or {}).get(role) or {}
        if (not full and old.get("path") == os.path.abspath(path) and old.get("size") == st["size"]
                and old.get("mtime_ns") == st["mtime_ns"] and isinstance(old.get("sha256"), str)):
            digest = old["sha256"]
        else:
            try:
                digest = _content_hash(path, full)
            except OSError as e:
                raise AvsmError(f"cannot read {role}: {e.strerror or e}", path) from e
        out[role] = {"path": os.path.abspath(path), **st, "sha256": digest}
    return out


def fingerprint(key: str, stamps: Mapping[str, Mapping[str, Any]]) -> str:
    """The job fingerprint: SHA-256 of the settings key and of every input's content (not its path)."""
    payload = {"v": DONE_VERSION, "key": key, "inputs": {r: s["sha256"] for r, s in sorted(stamps.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _output_files(folder: str) -> list[str]:
    """Relative paths of the files under ``folder`` (hidden entries and ``done.json`` excluded)."""
    out = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(base, f), folder)
            if not f.startswith(".") and rel != DONE_NAME:
                out.append(rel)
    return out


def _file_record(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(path)}


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def verify_done(folder: str, fp: str, full: bool = False) -> dict[str, Any] | None:
    """The ``done.json`` of ``folder`` if it has fingerprint ``fp`` and every listed output is intact.

    An output counts as intact when it has its recorded size and either its recorded
    modification time or (changed time, or ``full``) its recorded SHA-256.
    """
    rec = _read_json(os.path.join(folder, DONE_NAME))
    if rec is None or rec.get("version") != DONE_VERSION or rec.get("fingerprint") != fp:
        return None
    try:
        files = rec["files"]
        if not files:
            return None
        for rel, r in files.items():
            p = os.path.join(folder, rel)
            st = os.stat(p)
            if st.st_size != r["size"]:
                return None
            if (full or st.st_mtime_ns != r.get("mtime_ns")) and _sha256_file(p) != r["sha256"]:
                return None
    except (KeyError, TypeError, AttributeError, OSError):
        return None
    return rec


# --------------------------------------------------------------------------- locks


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, from ``/proc``), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return rest[0] if rest else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, or a new process reusing the pid, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    if _proc_state(pid) in ("Z", "X"):
        return False
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


_HOST = socket.gethostname()


class JobLock:
    """An exclusive lock on one job: a file created with ``O_CREAT | O_EXCL``.

    Use :meth:`acquire`; it returns ``None`` (with the holder in :attr:`holder` of the class
    method's second value) when a live process holds the lock.  While held, a daemon thread
    refreshes the file's time stamp every :data:`HEARTBEAT_S` seconds.
    """

    def __init__(self, path: str, info: dict[str, Any], heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = path
        self.info = info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"avsm-lock-{os.path.basename(path)}")
        self._thread.start()

    @classmethod
    def acquire(cls, path: str, *, run_id: str | None = None, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
                attempt: int = 1, heartbeat_s: float = HEARTBEAT_S
                ) -> tuple[JobLock | None, dict[str, Any] | None]:
        """Take the lock, or report its live holder.

        Returns:
            ``(lock, previous)``: ``previous`` is the stale lock taken over (its ``attempt``
            tells how many attempts died before), or ``(None, holder)`` when a live process
            holds it.
        """
        os.makedirs(os.path.dirname(path), exist_ok=True)
        taken_over: dict[str, Any] | None = None
        holder: dict[str, Any] | None = None
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(path)
                if holder is None and not os.path.exists(path):
                    continue  # released between the create and the read: try the create again
                if not _lock_stale(path, holder, run_id, timeout_s):
                    return None, holder or {"host": "?", "pid": 0}
                if _break_lock(path, holder):
                    log.warning("taking over the stale lock of %s (holder %s)", path, _holder_text(holder))
                    taken_over = holder or {}
                continue
            prev_attempt = int((taken_over or {}).get("attempt", 0) or 0)
            info = {"host": _HOST, "pid": os.getpid(), "start": _proc_start(os.getpid()), "run_id": run_id,
                    "token": uuid.uuid4().hex, "time": time.time(),
                    "attempt": max(int(attempt), prev_attempt + 1)}
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(info, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError:
                _unlink(path)
                raise
            return cls(path, info, heartbeat_s), taken_over
        return None, holder or {"host": "?", "pid": 0}

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            cur = _read_json(self.path)
            if cur is None or cur.get("token") != self.info["token"]:
                log.warning("lock %s was taken over by %s while this process held it", self.path,
                            _holder_text(cur))
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def still_held(self) -> bool:
        """Whether the lock file is still this process's (not taken over as stale meanwhile)."""
        cur = _read_json(self.path)
        return cur is not None and cur.get("token") == self.info["token"]

    def release(self) -> None:
        """Stop refreshing and remove the lock file (only if it is still this process's)."""
        self._stop.set()
        cur = _read_json(self.path)
        if cur is not None and cur.get("token") == self.info["token"]:
            _unlink(self.path)

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_text(h: Mapping[str, Any] | None) -> str:
    if not h:
        return "unknown (unreadable lock file)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("time") or 0)))
    return f"{h.get('host')}:{h.get('pid')} since {since}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _lock_stale(path: str, holder: Mapping[str, Any] | None, run_id: str | None, timeout_s: float) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: the caller retries the exclusive create, breaking nothing
    if holder is None:
        return age > 60.0  # being written right now, or its writer died before writing it
    if holder.get("host") == _HOST:
        # on this host the holder's pid (and start time) settle it: a live holder is never stale
        return not pid_alive(int(holder.get("pid") or 0), holder.get("start")) or age > timeout_s
    if run_id is not None and holder.get("run_id") == run_id:
        return True  # an earlier attempt of this very job in this run on another host (its worker died)
    return age > timeout_s


def _break_lock(path: str, holder: Mapping[str, Any] | None) -> bool:
    """Remove the stale lock ``holder`` (serialised by a ``.break`` file); whether this call removed it."""
    brk = path + ".break"
    try:
        fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - os.stat(brk).st_mtime > 60.0:
                _unlink(brk)  # a breaker died
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    os.close(fd)
    try:
        cur = _read_json(path)
        if (cur or {}).get("token") == (holder or {}).get("token"):
            _unlink(path)
            return True
        return False
    finally:
        _unlink(brk)


# --------------------------------------------------------------------------- failures


def record_failure(root: str, job: Job, error: str, *, fp: str | None = None, attempts: int = 1,
                   stamps: Mapping[str, Any] | None = None) -> None:
    """Write the failure record of ``job`` (best effort: never raises)."""
    rec = {"name": job.name, "error": error, "fingerprint": fp, "attempts": attempts, "host": _HOST,
           "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "inputs": dict(stamps or {})}
    try:
        atomic_write_text(_state_path(root, "failed", job.name, ".json"), json.dumps(rec, indent=1))
    except Exception as e:  # noqa: BLE001 - e.g. a full disk: the caller's record still says failed
        log.warning("could not write the failure record of %s: %s", job.name, one_line(e))


def failed_record(job: Job, root: str, error: str, *, attempts: int = 1) -> dict[str, Any]:
    """The record of a job that an engine saw fail outside :func:`run_job` (e.g. its worker died);
    also writes its failure record."""
    rec = _base_record(job, job_dir(root, job.name))
    rec.update(error=error, attempts=attempts)
    record_failure(root, job, error, attempts=attempts, fp=_last_fingerprint(root, job))
    return rec


def _last_fingerprint(root: str, job: Job) -> str | None:
    """The fingerprint of ``job`` now (hashes cached; ``None`` if an input is unreadable)."""
    try:
        done = _read_json(os.path.join(job_dir(root, job.name), DONE_NAME)) or {}
        return fingerprint(job.key, stamp_inputs(job.inputs, done.get("inputs")))
    except AvsmError:
        return None


def _clear_failure(root: str, name: str) -> None:
    _unlink(_state_path(root, "failed", name, ".json"))


# --------------------------------------------------------------------------- the unit of work


def _base_record(job: Job, folder: str) -> dict[str, Any]:
    return {"name": job.name, **dict(job.meta), "out_dir": folder, "status": "failed", "error": "",
            "seconds": 0.0, "attempts": 0, "summary": {}, "files": {}}


def _check_outside(job: Job, folder: str) -> None:
    real = os.path.realpath(folder)
    for role, p in job.inputs:
        rp = os.path.realpath(p)
        if rp == real or rp.startswith(real + os.sep):
            raise AvsmError(f"{role} input lies in the job's output folder {folder}; an output could "
                            "overwrite it", p)


def _snapshot(folder: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for rel in _output_files(folder):
        try:
            st = os.stat(os.path.join(folder, rel))
        except OSError:
            continue
        out[rel] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _prepare(folder: str) -> dict[str, Any] | None:
    """Make ``folder`` ready for a new attempt (lock held): drop ``done.json`` and dead staging folders."""
    os.makedirs(folder, exist_ok=True)
    old = _read_json(os.path.join(folder, DONE_NAME))
    _unlink(os.path.join(folder, DONE_NAME))
    for entry in os.listdir(folder):
        if entry.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
    return old


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


def skipped_record(job: Job, root: str, verify: str = "quick") -> dict[str, Any] | None:
    """The ``skipped`` record of ``job`` when it is verified done, else ``None`` (cheap when not started:
    engines call it before dispatching, so that a resumed batch sends no finished job to a worker)."""
    folder = job_dir(root, job.name)
    done = _read_json(os.path.join(folder, DONE_NAME))
    if not done:
        return None
    try:
        fp = fingerprint(job.key, stamp_inputs(job.inputs, done.get("inputs"), full=verify == "full"))
    except AvsmError:
        return None
    ok = verify_done(folder, fp, verify == "full")
    if ok is None:
        return None
    rec = _base_record(job, folder)
    rec.update(status="skipped", summary=ok.get("summary", {}), files=ok["files"], seconds=ok.get("seconds", 0.0),
               attempts=ok.get("attempts", 1), threads=ok.get("threads"), fingerprint=fp, host=_HOST,
               pid=os.getpid())
    return rec


def run_job(job: Job, root: str, *, threads: int | None = None, attempt: int = 1, run_id: str | None = None,
            verify: str = "quick", lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
            isolated: bool = False) -> dict[str, Any]:
    """Run ``job`` under ``root`` unless it is already done; idempotent, never raises for the job's own failure.

    Args:
        job: the job.
        root: the batch root (the job writes into ``root/<job.name>/``).
        threads: CPU threads to use (:func:`avsm.threads.apply_threads`); ``None`` leaves them.
        attempt: attempt number given by the engine (1 first).
        run_id: id of the run; a lock left by an earlier attempt of the same run is taken over.
        verify: ``quick`` (hash only files whose size or time changed) or ``full``.
        lock_timeout_s: a lock not refreshed for this long is taken over (any host).
        isolated: the job runs in a worker process of its own (told to ``work``).

    Returns:
        The record: ``name``, the job's ``meta``, ``out_dir``, ``status`` (``done``,
        ``skipped``: verified done before, ``busy``: another live process holds the lock,
        ``failed``), ``error`` (one line), ``seconds``, ``attempts``, ``fingerprint``,
        ``summary`` (``work``'s), ``files`` (``{relative path: {size, mtime_ns, sha256}}``),
        ``threads``, ``host`` and ``pid``.
    """
    t0 = time.perf_counter()
    folder = job_dir(root, job.name)
    rec = _base_record(job, folder)
    rec.update(threads=threads, host=_HOST, pid=os.getpid())
    full = verify == "full"
    state: dict[str, Any] = {"fp": None, "stamps": None, "attempts": attempt}

    def fail(e: Exception) -> dict[str, Any]:
        err = one_line(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            err = f"no space left on device while writing the outputs ({err})"
        log.warning("%s failed: %s", job.name, err)
        rec.update(status="failed", error=err, seconds=round(time.perf_counter() - t0, 3),
                   attempts=state["attempts"])
        record_failure(root, job, err, fp=state["fp"], attempts=state["attempts"], stamps=state["stamps"])
        return rec

    try:
        _check_outside(job, folder)
        old_done = _read_json(os.path.join(folder, DONE_NAME)) or {}
        stamps = state["stamps"] = stamp_inputs(job.inputs, old_done.get("inputs"), full=full)
        fp = state["fp"] = rec["fingerprint"] = fingerprint(job.key, stamps)
        done = verify_done(folder, fp, full)
        if done is not None:
            rec.update(status="skipped", summary=done.get("summary", {}), files=done["files"],
                       seconds=done.get("seconds", 0.0), attempts=done.get("attempts", 1),
                       threads=done.get("threads", threads))
            return rec
        lock, other = JobLock.acquire(_state_path(root, "locks", job.name, ".lock"), run_id=run_id,
                                      timeout_s=lock_timeout_s, attempt=attempt)
    except Exception as e:  # noqa: BLE001 - a job's failure must not stop the batch
        return fail(e)
    if lock is None:
        rec.update(status="busy", error=f"being run by {_holder_text(other)}")
        return rec
    with lock:  # failures are recorded while the lock is held
        try:
            attempts = state["attempts"] = int(lock.info["attempt"])
            if other is not None:
                log.warning("%s: an earlier attempt (%s) died; attempt %d", job.name, _holder_text(other), attempts)
            done = verify_done(folder, fp, full)  # finished by another process since the first check
            if done is not None:
                rec.update(status="skipped", summary=done.get("summary", {}), files=done["files"],
                           seconds=done.get("seconds", 0.0), attempts=done.get("attempts", 1))
                return rec
            old = _prepare(folder) or {}
            before = _snapshot(folder)
            if threads is not None:
                from avsm.threads import apply_threads

                apply_threads(threads)
            ctx = JobContext(job=job, dir=folder, fingerprint=fp, threads=threads, attempt=attempts,
                             isolated=isolated)
            summary = job.work(ctx)
            after = stamp_inputs(job.inputs, stamps)
            for role, s in after.items():
                if s["sha256"] != stamps[role]["sha256"] or s["size"] != stamps[role]["size"]:
                    raise AvsmError(f"{role} input changed while the job ran", s["path"])
            files: dict[str, Any] = {}
            for rel in _output_files(folder):
                st = os.stat(os.path.join(folder, rel))
                if before.get(rel) != (st.st_ino, st.st_mtime_ns, st.st_size):
                    files[rel] = _file_record(os.path.join(folder, rel))
            if not files:
                raise AvsmError("the job wrote no output files", folder)
            old_files = old.get("files") if isinstance(old.get("files"), dict) else {}
            for rel in old_files:
                if rel not in files and rel in before:  # an output of the job's earlier version
                    _unlink(os.path.join(folder, rel))
            seconds = round(time.perf_counter() - t0, 3)
            done_rec = {"version": DONE_VERSION, "name": job.name, "fingerprint": fp, "key": job.key,
                        "inputs": stamps, "files": files, "summary": _json_safe(dict(summary or {})),
                        "meta": _json_safe(dict(job.meta)), "seconds": seconds, "attempts": attempts,
                        "threads": threads, "host": _HOST, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if not lock.still_held():
                raise AvsmError("the pair's lock was taken over by another process while it ran; "
                                "that process owns the pair now", lock.path)
            # written last, atomically: its presence means every file above is complete
            atomic_write_text(os.path.join(folder, DONE_NAME), json.dumps(done_rec, indent=1))
            _clear_failure(root, job.name)
            rec.update(status="done", summary=done_rec["summary"], files=files, seconds=seconds, attempts=attempts)
            return rec
        except Exception as e:  # noqa: BLE001 - a job's failure must not stop the batch
            return fail(e)


# --------------------------------------------------------------------------- plan and status


def plan_entry(job: Job) -> dict[str, Any]:
    """What the plan (and :func:`collect`) knows of a job: name, inputs, key, meta."""
    return {"name": job.name, "inputs": [list(x) for x in job.inputs], "key": job.key,
            "meta": _json_safe(dict(job.meta))}


def write_plan(root: str, kind: str, jobs: Sequence[Job], extra: Mapping[str, Any] | None = None) -> str:
    """Write ``ROOT/.avsm-batch/plan.json`` (the jobs of this run) unless it already says the same."""
    plan = {"version": PLAN_VERSION, "kind": kind, "jobs": [plan_entry(j) for j in jobs],
            **_json_safe(dict(extra or {}))}
    path = os.path.join(root, STATE_DIR, "plan.json")
    text = json.dumps(plan, indent=1)
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return path
    except OSError:
        pass
    atomic_write_text(path, text)
    return path


def read_plan(root: str) -> dict[str, Any]:
    """The plan of the latest run under ``root``.

    Raises:
        AvsmError: no readable plan (no batch ran there).
    """
    path = os.path.join(root, STATE_DIR, "plan.json")
    plan = _read_json(path)
    if plan is None or plan.get("version") != PLAN_VERSION or not isinstance(plan.get("jobs"), list):
        raise AvsmError("no batch here (no readable .avsm-batch/plan.json); run avsm register --pairs or "
                        "avsm evaluate with this output folder first", root)
    return plan


def collect(root: str, jobs: Sequence[Mapping[str, Any]], *, verify: str = "quick") -> list[dict[str, Any]]:
    """The state of each planned job (dicts with ``name``, ``inputs``, ``key``, ``meta``), from the disk.

    Returns:
        Records as :func:`run_job`'s, with ``status`` ``done``, ``failed`` (this version of
        the job failed; ``error``, ``attempts``), ``running`` (a live lock; ``error`` says
        whose) or ``missing`` (never run, or run for other inputs or settings).
    """
    full = verify == "full"
    out = []
    for j in jobs:
        name = j["name"]
        folder = job_dir(root, name)
        rec: dict[str, Any] = {"name": name, **dict(j.get("meta") or {}), "out_dir": folder, "status": "missing",
                               "error": "", "seconds": 0.0, "attempts": 0, "summary": {}, "files": {}}
        inputs = [(r, p) for r, p in j["inputs"]]
        failure = _read_json(_state_path(root, "failed", name, ".json"))
        done = _read_json(os.path.join(folder, DONE_NAME)) or {}
        lock_path = _state_path(root, "locks", name, ".lock")
        if not done and failure is None:  # nothing written yet: no need to hash its inputs
            holder = _read_json(lock_path)
            absent = [(r, p) for r, p in inputs if not os.path.exists(p)]
            if os.path.exists(lock_path) and not _lock_stale(lock_path, holder, None, DEFAULT_LOCK_TIMEOUT_S):
                rec.update(status="running", error=f"being run by {_holder_text(holder)}")
            elif absent:
                rec.update(status="failed", error=str(AvsmError(f"{absent[0][0]} file not found", absent[0][1])))
            out.append(rec)
            continue
        fp = None
        try:
            stamps = stamp_inputs(inputs, done.get("inputs") or (failure or {}).get("inputs"), full=full)
            fp = fingerprint(j["key"], stamps)
        except AvsmError as e:
            rec["error"] = str(e)
        if fp is not None:
            ok = verify_done(folder, fp, full)
            if ok is not None:
                rec.update(status="done", summary=ok.get("summary", {}), files=ok.get("files", {}),
                           seconds=ok.get("seconds", 0.0), attempts=ok.get("attempts", 1),
                           threads=ok.get("threads"), fingerprint=fp)
                out.append(rec)
                continue
        rec["fingerprint"] = fp
        holder = _read_json(lock_path)
        if os.path.exists(lock_path) and not _lock_stale(lock_path, holder, None, DEFAULT_LOCK_TIMEOUT_S):
            rec.update(status="running", error=f"being run by {_holder_text(holder)}")
        elif fp is None:  # an input is missing or unreadable now: it cannot succeed as it stands
            rec.update(status="failed", attempts=(failure or {}).get("attempts", 0))
        elif failure is not None and failure.get("fingerprint") == fp:
            rec.update(status="failed", error=failure.get("error") or "failed",
                       attempts=failure.get("attempts", 1))
        elif done:
            rec["error"] = "outputs are for other inputs or settings, or were changed"
        out.append(rec)
    return out
