"""Engines that run :class:`avsm.jobs.Job` lists: this process, local workers, Dask; and static shards.

Every engine calls :func:`avsm.jobs.run_job` once per job, so idempotence, fingerprints,
locks and atomic commits are the same everywhere.

* **Shards** (:class:`Shard`): ``--shard I/N`` takes jobs ``I, I+N, I+2N, ...`` (0 ≤ I < N).
  The default comes from a SLURM job array (``SLURM_ARRAY_TASK_ID`` relative to
  ``SLURM_ARRAY_TASK_MIN`` and ``_STEP``, out of ``SLURM_ARRAY_TASK_COUNT``) and from
  torchrun (``RANK`` of ``WORLD_SIZE``); both together nest.  Shards never wait for each
  other; ``avsm status`` merges what they wrote.
* **This process** (``workers=1``): jobs one after the other.
* **Local workers** (``workers=N``): N worker processes (``spawn``), each running one job at a
  time.  A worker that dies mid-job (SIGKILL by the OOM killer, a segfault) costs that job one
  attempt: the worker is replaced, the job is queued again (``max_attempts``, default 2), then
  recorded as failed with the reason; the other workers and jobs go on.  With ``job_timeout_s``
  a job still running after that long has its worker killed and is recorded as failed ("timed
  out"), not retried (a job that hangs once usually hangs again); the others go on.  ``recycle=True``
  starts a fresh process for every job (``avsm evaluate``: peak memory per job).  With
  ``devices`` (one entry per GPU) worker ``k`` sees only GPU ``devices[k % len]``
  (``CUDA_VISIBLE_DEVICES``).
* **Dask** (``scheduler="dask"``: a ``LocalCluster`` of ``workers`` processes with one thread
  each; or a scheduler address ``tcp://host:8786``): one task per job, results handled (and
  released) as they finish.  When a worker dies (``KilledWorker``) the job is submitted again
  if it had not started there, or if it had and has used fewer than ``max_attempts``
  attempts (counted in its lock file, so a task only queued on the dead worker is not
  charged); then it is recorded as failed with the reason.  On the local cluster Dask's own
  retry is off (``allowed-failures`` 0); an existing cluster keeps its setting (Dask's
  default retries 3 times before avsm sees the death).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Any, TypeVar

from avsm.errors import AvsmError
from avsm.jobs import DEFAULT_LOCK_TIMEOUT_S, Job, failed_record, lock_attempt, one_line, run_job, skipped_record
from avsm.threads import THREAD_ENV_VARS, default_threads

__all__ = ["Shard", "gpu_devices", "parse_shard", "resolve_shard", "run_jobs", "shard_from_env"]

log = logging.getLogger(__name__)

T = TypeVar("T")
OnResult = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Static shard ``index`` of ``count`` (0-based): jobs ``index, index + count, ...``.

    Attributes:
        index, count: the shard.
        source: where it came from (``--shard``, ``SLURM_ARRAY_TASK_ID``, ``RANK/WORLD_SIZE``, ``default``).
    """

    index: int = 0
    count: int = 1
    source: str = "default"

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items (round robin in list order)."""
        return list(items[self.index::self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> Shard:
    """``"I/N"`` → :class:`Shard`.

    Raises:
        AvsmError: not two whole numbers, ``N < 1`` or ``I`` outside ``0 .. N-1``.
    """
    m = _SHARD_RE.match(text or "")
    if m is None or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise AvsmError(f"invalid --shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 ... 3/4")
    return Shard(int(m.group(1)), int(m.group(2)), "--shard")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise AvsmError(f"environment variable {name}={v!r} is not a whole number") from None


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """The shard given by a SLURM job array and/or torchrun (``0/1`` without either).

    Raises:
        AvsmError: inconsistent variables, or an array that is not a contiguous range
            (``--array=1,5,9``: give ``--shard`` explicitly).
    """
    env = os.environ if env is None else env
    parts: list[tuple[int, int, str]] = []
    tid = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if tid is not None:
        lo = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        hi = _env_int(env, "SLURM_ARRAY_TASK_MAX")
        if count is None and hi is not None:
            count = (hi - lo) // step + 1
        if count is None:
            raise AvsmError("SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT; give --shard I/N")
        idx, rem = divmod(tid - lo, step)
        if rem or not 0 <= idx < count or (hi is not None and (hi - lo) // step + 1 != count):
            raise AvsmError(f"SLURM array task {tid} is not part of a contiguous array of {count} tasks "
                            "(use --array=MIN-MAX[:STEP]) ; give --shard I/N")
        parts.append((idx, count, "SLURM_ARRAY_TASK_ID"))
    world = _env_int(env, "WORLD_SIZE")
    if world is not None and world > 1:
        rank = _env_int(env, "RANK")
        if rank is None or not 0 <= rank < world:
            raise AvsmError(f"bad torchrun environment RANK={env.get('RANK')!r} WORLD_SIZE={world}")
        parts.append((rank, world, "RANK/WORLD_SIZE"))
    index, count = 0, 1
    for i, n, _ in parts:
        index, count = index * n + i, count * n
    return Shard(index, count, " and ".join(s for _, _, s in parts) or "default")


def resolve_shard(shard: str | Shard | None, env: Mapping[str, str] | None = None) -> Shard:
    """An explicit shard (``"I/N"`` or :class:`Shard`), else :func:`shard_from_env`."""
    if isinstance(shard, Shard):
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise AvsmError(f"invalid shard {shard.index}/{shard.count}: expected 0 <= I < N")
        return shard
    if shard is not None and str(shard).strip():
        return parse_shard(str(shard))
    return shard_from_env(env)


# --------------------------------------------------------------------------- devices


def gpu_devices(device: str) -> list[str]:
    """The GPUs ``--device cuda`` spreads workers over (``CUDA_VISIBLE_DEVICES`` entries or indices).

    ``cuda:N`` names one GPU and returns ``[]`` (no pinning: every worker uses it).

    Raises:
        AvsmError: ``cuda`` but no GPU visible.
    """
    if device != "cuda":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip() and x.strip() != "-1"]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        raise AvsmError("--device cuda but no GPU is visible (CUDA_VISIBLE_DEVICES / driver)")
    return ids


# --------------------------------------------------------------------------- engine entry


def run_jobs(
    jobs: Sequence[Job],
    root: str,
    *,
    scheduler: str = "local",
    workers: int = 1,
    threads: int | None = None,
    devices: Sequence[str] | None = None,
    recycle: bool = False,
    max_attempts: int = 2,
    run_id: str | None = None,
    verify: str = "quick",
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    on_result: OnResult | None = None,
    connect_timeout_s: float | None = None,
    job_timeout_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` with the chosen engine; returns ``{name: record}`` (see :func:`avsm.jobs.run_job`).

    Args:
        jobs: the jobs (this shard's).
        root: the batch root.
        scheduler: ``local`` (this process or local workers), ``dask`` (a local Dask
            cluster of ``workers`` processes) or a Dask scheduler address.
        workers: parallel processes (``local``: 1 runs in this process unless ``recycle``
            or ``devices``).
        threads: CPU threads per job (``None``: the CPUs available split between the
            workers; on an existing Dask cluster, each worker's CPUs split between its threads).
        devices: GPUs to pin local workers to (see :func:`gpu_devices`).
        recycle: a fresh worker process per job (local workers).
        max_attempts: attempts of a job whose worker died.
        run_id: the run's id (:func:`avsm.jobs.new_run_id`).
        verify: ``quick`` or ``full`` (see :func:`avsm.jobs.run_job`).
        lock_timeout_s: see :func:`avsm.jobs.run_job`.
        on_result: called in this process with each record as it arrives.
        connect_timeout_s: how long to try to reach a Dask scheduler (default: Dask's
            ``distributed.comm.timeouts.connect``, 30 s unless configured).
        job_timeout_s: local engine: a job running longer is killed (its worker process) and
            recorded as failed; jobs then always run in worker processes, even with one worker.

    Raises:
        AvsmError: Dask not installed, or its scheduler unreachable; ``job_timeout_s`` with Dask
            (use Dask's own worker lifetime settings) or not > 0.
    """
    cb: OnResult = on_result or (lambda rec: None)
    kw = {"run_id": run_id, "verify": verify, "lock_timeout_s": lock_timeout_s}
    local = scheduler in ("", "local", None)
    workers = max(1, int(workers))
    if job_timeout_s is not None:
        if not job_timeout_s > 0:
            raise AvsmError(f"the job timeout must be > 0 s, got {job_timeout_s}")
        if not local:
            raise AvsmError("--job-timeout works with local workers only; on Dask use its worker lifetime "
                            "settings (distributed.worker.lifetime.duration)")
    out: dict[str, dict[str, Any]] = {}
    if local and workers == 1 and not recycle and not devices and job_timeout_s is None:
        if threads is None:
            threads = default_threads(1)
        for job in jobs:
            out[job.name] = rec = run_job(job, root, threads=threads, **kw)
            cb(rec)
        return out
    todo = []
    for job in jobs:  # a resumed batch sends no finished job to a worker
        rec = skipped_record(job, root, verify)
        if rec is None:
            todo.append(job)
        else:
            out[job.name] = rec
            cb(rec)
    if not todo:
        return out
    if local:
        if threads is None:
            threads = default_threads(min(workers, len(todo)))
        out.update(_LocalPool(min(workers, len(todo)), threads, list(devices or []), recycle, max_attempts,
                              job_timeout_s).run(todo, root, kw, cb))
        return out
    out.update(_run_dask(todo, root, scheduler, workers, threads, max_attempts, kw, cb, connect_timeout_s))
    return out


# --------------------------------------------------------------------------- local workers


def _worker_main(conn: Any) -> None:
    """A local worker: run jobs sent over ``conn`` until ``None`` or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job, root, kw = msg
        rec = run_job(job, root, isolated=True, **kw)
        try:
            conn.send(rec)
        except (BrokenPipeError, OSError):
            return


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def death_reason(exitcode: int | None) -> str:
    """Why a worker process ended, in words."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


class _Slot:
    """One worker process and the job it runs."""

    def __init__(self, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.env = env
        self.proc: Any = None
        self.conn: Any = None
        self.job: Job | None = None
        self.attempt = 0
        self.started = 0.0  # time.monotonic() when the job was sent


class _LocalPool:
    """Local worker processes that isolate faults (see the module docstring)."""

    def __init__(self, workers: int, threads: int, devices: list[str], recycle: bool, max_attempts: int,
                 job_timeout_s: float | None = None) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.job_timeout_s = job_timeout_s
        self.threads = threads
        self.recycle = recycle
        self.max_attempts = max(1, int(max_attempts))
        env = {v: str(threads) for v in THREAD_ENV_VARS}
        self.slots = [_Slot(i, {**env, **({"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {})})
                      for i in range(workers)]

    def _start(self, s: _Slot) -> None:
        parent, child = self.ctx.Pipe()
        with _environ(s.env):
            p = self.ctx.Process(target=_worker_main, args=(child,), name=f"avsm-worker-{s.index}")
            p.start()
        child.close()
        s.proc, s.conn = p, parent
        log.debug("worker %d started (pid %d, %s)", s.index, p.pid, s.env.get("CUDA_VISIBLE_DEVICES", "cpu"))

    def _stop(self, s: _Slot, *, kill: bool = False) -> None:
        if s.proc is None:
            return
        if not kill:
            with contextlib.suppress(OSError):
                s.conn.send(None)
            s.proc.join(timeout=10)
        if s.proc.is_alive():
            s.proc.terminate()
            s.proc.join(timeout=10)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()
        with contextlib.suppress(OSError):
            s.conn.close()
        s.proc = s.conn = None

    def run(self, jobs: Sequence[Job], root: str, kw: dict[str, Any], cb: OnResult) -> dict[str, dict[str, Any]]:
        pending: deque[tuple[Job, int]] = deque((j, 1) for j in jobs)
        out: dict[str, dict[str, Any]] = {}

        def finish(rec: dict[str, Any]) -> None:
            out[rec["name"]] = rec
            cb(rec)

        try:
            while pending or any(s.job is not None for s in self.slots):
                for s in self.slots:
                    if s.job is None and pending:
                        if s.proc is None or not s.proc.is_alive():
                            self._stop(s, kill=True)
                            self._start(s)
                        job, attempt = pending.popleft()
                        try:
                            s.conn.send((job, root, {**kw, "threads": self.threads, "attempt": attempt}))
                        except (BrokenPipeError, OSError):  # died before taking it: not the job's fault
                            pending.appendleft((job, attempt))
                            self._stop(s, kill=True)
                            continue
                        s.job, s.attempt, s.started = job, attempt, time.monotonic()
                busy = [s for s in self.slots if s.job is not None]
                if not busy:
                    continue
                wait_s = 5.0
                if self.job_timeout_s is not None:
                    left = min(s.started + self.job_timeout_s for s in busy) - time.monotonic()
                    wait_s = min(wait_s, max(0.05, left))
                ready = mp_wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=wait_s)
                for s in busy:
                    rec = None
                    if (self.job_timeout_s is not None and s.conn not in ready and s.proc.sentinel not in ready
                            and time.monotonic() - s.started > self.job_timeout_s):
                        job = s.job
                        assert job is not None
                        s.job = None
                        self._stop(s, kill=True)  # SIGTERM, then SIGKILL: the job's lock goes stale with it
                        err = f"timed out after {self.job_timeout_s:g} s (--job-timeout); its worker was killed"
                        log.warning("%s failed: %s", job.name, err)
                        finish(failed_record(job, root, err, attempts=s.attempt))
                        continue
                    if s.conn in ready or s.proc.sentinel in ready:
                        try:
                            if s.conn.poll():
                                rec = s.conn.recv()
                        except (EOFError, OSError):
                            rec = None
                        if rec is None and s.proc.is_alive():
                            continue
                    elif s.proc.is_alive():
                        continue
                    job, attempt = s.job, s.attempt
                    s.job = None
                    if rec is not None:
                        finish(rec)
                        if self.recycle:
                            self._stop(s)
                        continue
                    s.proc.join(timeout=10)
                    why = death_reason(s.proc.exitcode)
                    self._stop(s, kill=True)
                    assert job is not None
                    if attempt < self.max_attempts:
                        log.warning("%s: worker process %s mid-job; trying again (attempt %d of %d)", job.name, why,
                                    attempt + 1, self.max_attempts)
                        pending.append((job, attempt + 1))
                    else:
                        err = f"worker process {why} while running this job ({attempt} attempts)"
                        log.warning("%s failed: %s", job.name, err)
                        finish(failed_record(job, root, err, attempts=attempt))
        except BaseException:
            for s in self.slots:
                self._stop(s, kill=True)
            raise
        for s in self.slots:
            self._stop(s)
        return out


# --------------------------------------------------------------------------- Dask


def _dask_task(job: Job, root: str, threads: int | None, kw: dict[str, Any]) -> dict[str, Any]:
    """Run one job on a Dask worker (threads: this worker's CPUs split between its task threads)."""
    if threads is None:
        nthreads = 1
        try:
            from distributed import get_worker

            w = get_worker()
            nthreads = int(getattr(getattr(w, "state", None), "nthreads", 0) or getattr(w, "nthreads", 1) or 1)
        except Exception:  # noqa: BLE001 - not on a worker (tests), or another distributed version
            pass
        threads = default_threads(nthreads)
    return run_job(job, root, threads=threads, isolated=True, **kw)


def _run_dask(jobs: Sequence[Job], root: str, scheduler: str, workers: int, threads: int | None,
              max_attempts: int, kw: dict[str, Any], cb: OnResult, connect_timeout_s: float | None
              ) -> dict[str, dict[str, Any]]:
    try:
        import dask
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:
        raise AvsmError(f"--scheduler {scheduler} needs dask.distributed: pip install 'avsm[dask]' ({e})") from None
    try:
        from distributed import KilledWorker
    except ImportError:  # older distributed
        from distributed.scheduler import KilledWorker  # type: ignore[no-redef]

    cluster = None
    if scheduler == "dask":
        workers = max(1, int(workers))
        if threads is None:
            threads = default_threads(workers)
        # avsm counts the attempts (from the pair's lock): Dask's own retry off, one task per worker thread
        with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                              "distributed.scheduler.worker-saturation": 1.0}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR, env={v: str(threads) for v in THREAD_ENV_VARS})
        client = Client(cluster)
    else:
        address = scheduler if "://" in scheduler else f"tcp://{scheduler}"
        timeout = (f"{connect_timeout_s}s" if connect_timeout_s is not None
                   else dask.config.get("distributed.comm.timeouts.connect", "30s"))
        try:
            client = Client(address, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - OSError, TimeoutError, ValueError (bad address)
            raise AvsmError(f"cannot reach the Dask scheduler ({one_line(e)})", scheduler) from None
    out: dict[str, dict[str, Any]] = {}
    futures: dict[Any, tuple[int, Job, int]] = {}
    pending = as_completed()
    resubmits = 0

    def submit(i: int, job: Job, attempt: int) -> None:
        fut = client.submit(_dask_task, job, root, threads, {**kw, "attempt": attempt},
                            key=f"avsm-{kw.get('run_id')}-{i}-{attempt}-{resubmits}", pure=False)
        futures[fut] = (i, job, attempt)
        pending.add(fut)

    try:
        for i, job in enumerate(jobs):
            submit(i, job, 1)
        for fut in pending:
            i, job, attempt = futures.pop(fut)
            try:
                rec = fut.result()
            except KilledWorker as e:
                used = lock_attempt(root, job.name) or 0  # a started attempt leaves its lock behind
                if used < max_attempts and resubmits < len(jobs) * (max_attempts + 2):
                    resubmits += 1
                    log.warning("%s: Dask worker died %s; trying again (attempt %d of %d)", job.name,
                                "while running it" if used >= attempt else "before it started", used + 1,
                                max_attempts)
                    submit(i, job, used + 1)
                    fut.release()
                    continue
                rec = failed_record(job, root, f"Dask worker died while running this job ({used} attempts; "
                                    f"{one_line(e)})", attempts=used)
            except Exception as e:  # noqa: BLE001 - a lost connection, a cancelled task
                rec = failed_record(job, root, f"Dask: {one_line(e)}")
            fut.release()  # results live here now: a later worker death must not recompute them
            out[job.name] = rec
            cb(rec)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return out
