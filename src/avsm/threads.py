"""How many CPU threads a command may use, and setting them everywhere at once.

The default is the number of CPUs this process may really run on:

* the CPU affinity mask (``os.sched_getaffinity``: ``taskset``, SLURM's ``--cpus-per-task``
  with task affinity, a cpuset cgroup), and
* the cgroup CPU quota (cgroup v2 ``cpu.max``; cgroup v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``; Docker's ``--cpus``, Kubernetes limits), rounded up,

whichever is smaller; ``os.cpu_count()`` (every CPU of the machine) is only the fallback.
Work split between ``workers`` processes gets ``available // workers`` threads each (at
least 1).

:func:`apply_threads` sets the number for torch (intra-op threads), OpenMP/MKL/OpenBLAS
(environment, read by libraries loaded later and by child processes), and ITK/SimpleITK
(``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` and SimpleITK's global default).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from avsm.errors import AvsmError

__all__ = [
    "THREAD_ENV_VARS",
    "add_threads_argument",
    "affinity_cpus",
    "apply_threads",
    "available_cpus",
    "cgroup_cpu_limit",
    "default_threads",
    "resolve_threads",
]

log = logging.getLogger(__name__)

#: Environment variables that carry the thread count to native libraries and child processes.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the mask is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _v2_limit(folder: str) -> float | None:
    text = _read(os.path.join(folder, "cpu.max"))
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: str) -> float | None:
    q, p = _read(os.path.join(folder, "cpu.cfs_quota_us")), _read(os.path.join(folder, "cpu.cfs_period_us"))
    try:
        quota, period = float(q or ""), float(p or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(root: str, rel: str) -> list[str]:
    """``root/rel``, its parents, ..., ``root`` (a cgroup limit applies from any ancestor)."""
    rel = rel.strip("/")
    parts = rel.split("/") if rel else []
    return [os.path.join(root, *parts[:k]) for k in range(len(parts), -1, -1)]


def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. ``1.5``), or ``None`` when unlimited.

    Both hierarchies are read: cgroup v2 (``<root>/<path>/cpu.max``, ``"max 100000"`` is no
    limit) and cgroup v1 (``<root>/cpu[,cpuacct]/<path>/cpu.cfs_quota_us``, ``-1`` is no
    limit).  The smallest quota on the way from the process's cgroup to the root counts.
    Inside a container the namespace root is the container's own cgroup.

    Args:
        cgroup_root: where the cgroup file systems are mounted.
        proc_cgroup: the process's cgroup membership file.
    """
    limits: list[float] = []
    text = _read(proc_cgroup) or ""
    v2_path, v1_path = None, None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    # cgroup v2: unified hierarchy at the root (or at <root>/unified on hybrid systems)
    for base in (cgroup_root, os.path.join(cgroup_root, "unified")):
        if os.path.exists(os.path.join(base, "cgroup.controllers")) or os.path.exists(os.path.join(base, "cpu.max")):
            for folder in _ancestors(base, v2_path or ""):
                lim = _v2_limit(folder)
                if lim is not None:
                    limits.append(lim)
            break
    # cgroup v1: the cpu controller's mount
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = os.path.join(cgroup_root, name)
        if os.path.isdir(base):
            for folder in _ancestors(base, v1_path or ""):
                lim = _v1_limit(folder)
                if lim is not None:
                    limits.append(lim)
            break
    return min(limits) if limits else None


def available_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    n = affinity_cpus()
    lim = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if lim is not None:
        n = min(n, max(1, math.ceil(lim - 1e-9)))
    return max(1, n)


def default_threads(workers: int = 1) -> int:
    """Threads per worker when ``workers`` processes share :func:`available_cpus` (at least 1)."""
    return max(1, available_cpus() // max(1, int(workers)))


def resolve_threads(threads: int | None, workers: int = 1) -> int:
    """``threads`` when given (validated), else :func:`default_threads` ``(workers)``, the CPUs also
    split between torchrun's local ranks (``LOCAL_WORLD_SIZE``) when running under it.

    Raises:
        AvsmError: ``threads`` below 1.
    """
    if threads is None:
        try:
            local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        except ValueError:
            local_ranks = 1
        return default_threads(max(1, int(workers)) * local_ranks)
    if int(threads) < 1:
        raise AvsmError(f"--threads must be at least 1, got {threads}")
    return int(threads)


def apply_threads(threads: int) -> int:
    """Use ``threads`` CPU threads in this process (torch, ITK) and in the processes it starts.

    Sets :data:`THREAD_ENV_VARS`, ``torch.set_num_threads`` and SimpleITK's global default
    number of threads (only where those modules are imported or importable).

    Returns:
        ``threads``.
    """
    n = max(1, int(threads))
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    try:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    sitk = sys.modules.get("SimpleITK")
    if sitk is not None:
        try:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
        except Exception:  # noqa: BLE001 - an old SimpleITK without the setter
            log.debug("could not set SimpleITK's thread count")
    return n


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (``--threads``, ``--workers``)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, per: str = "") -> None:
    """Add ``--threads N`` (default ``None``: the CPUs available, split between workers)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help=f"CPU threads{per} (torch, ITK, OpenMP); default: the CPUs this process may use "
                             "(affinity mask and cgroup quota), split between the workers")
