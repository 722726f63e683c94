"""avsm.threads: the CPUs a process may use (affinity, cgroup v1/v2 quota), split between workers, applied
everywhere; ``--threads`` on every computing command and the value in ``summary.json``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avsm import threads as T
from avsm.errors import AvsmError


def _cgroup_v2(root: Path, quota: str, nested: str | None = None) -> Path:
    """A fake unified hierarchy: ``root/cpu.max`` and optionally ``root/job/cpu.max``; returns /proc/self/cgroup."""
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "cpu.max").write_text(quota + "\n")
    if nested is not None:
        (root / "job").mkdir()
        (root / "job" / "cpu.max").write_text(nested + "\n")
    proc = root.parent / "proc_cgroup"
    proc.write_text("0::/job\n" if nested is not None else "0::/\n")
    return proc


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    proc = _cgroup_v2(root, "max 100000")
    assert T.cgroup_cpu_limit(str(root), str(proc)) is None
    proc = _cgroup_v2(root, "150000 100000")
    assert T.cgroup_cpu_limit(str(root), str(proc)) == pytest.approx(1.5)
    root2 = tmp_path / "cg2"
    root2.mkdir()
    proc = _cgroup_v2(root2, "max 100000", nested="50000 100000")  # the job's own cgroup is the tighter one
    assert T.cgroup_cpu_limit(str(root2), str(proc)) == pytest.approx(0.5)


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    cpu = root / "cpu,cpuacct" / "slurm" / "job_7"
    cpu.mkdir(parents=True)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/slurm/job_7\n3:cpu,cpuacct:/slurm/job_7\n")
    assert T.cgroup_cpu_limit(str(root), str(proc)) == pytest.approx(3.0)
    proc.write_text("3:cpu,cpuacct:/\n")  # the root alone: unlimited
    assert T.cgroup_cpu_limit(str(root), str(proc)) is None


def test_available_cpus_caps_affinity_by_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    root = tmp_path / "cg"
    root.mkdir()
    proc = _cgroup_v2(root, "250000 100000")  # 2.5 CPUs -> 3
    assert T.available_cpus(str(root), str(proc)) == 3
    proc = _cgroup_v2(root, "max 100000")
    assert T.available_cpus(str(root), str(proc)) == 8  # affinity, not the machine's 64
    monkeypatch.setattr(T, "available_cpus", lambda *a, **k: 8)
    assert T.default_threads(1) == 8 and T.default_threads(3) == 2 and T.default_threads(16) == 1
    assert T.resolve_threads(None, 4) == 2 and T.resolve_threads(5, 4) == 5
    with pytest.raises(AvsmError, match="at least 1"):
        T.resolve_threads(0)


def test_apply_threads_sets_torch_env_and_itk(monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK as sitk
    import torch

    before = torch.get_num_threads()
    for v in T.THREAD_ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    try:
        T.apply_threads(1)
        assert torch.get_num_threads() == 1
        assert all(os.environ[v] == "1" for v in T.THREAD_ENV_VARS)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["register", "demo", "warp", "jacobian", "train", "evaluate"])
def test_every_computing_command_takes_threads(command: str) -> None:
    from avsm.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    p = sub.choices[command]
    opt = next((a for a in p._actions if "--threads" in a.option_strings), None)
    assert opt is not None and opt.default is None
    with pytest.raises(SystemExit):
        p.parse_args(["--threads", "0"])


def test_summary_json_records_threads(tmp_path: Path) -> None:
    """register_pair writes the torch thread count it ran with."""
    import json

    import numpy as np
    import SimpleITK as sitk

    from avsm.cli.main import main

    z, y, x = np.mgrid[0:9, 0:10, 0:11].astype(np.float32)
    for i, shift in enumerate((0.0, 1.0)):
        a = 100 * np.exp(-(((z - 4) / 3) ** 2 + ((y - 5 - shift) / 3) ** 2 + ((x - 5) / 4) ** 2)) + 1
        img = sitk.GetImageFromArray(a.astype(np.float32))
        img.SetSpacing((2.0, 2.0, 2.5))
        sitk.WriteImage(img, str(tmp_path / f"img{i}.nii.gz"))
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["register", "--fixed", str(tmp_path / "img0.nii.gz"), "--moving", str(tmp_path / "img1.nii.gz"),
                     "--out-dir", str(tmp_path / "o"), "--method", "affine", "--affine-iterations", "1,1,1",
                     "--format", "avsm", "--threads", "1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["threads"] == 1
