"""Faults and concurrency of the batch engines (avsm.jobs, avsm.executors, avsm.batch, avsm status).

* a local worker SIGKILLed mid-pair: that pair is retried, every other pair finishes;
* a pair whose worker dies every time: recorded with the reason after two attempts;
* two processes on one output folder: each pair is registered exactly once;
* per-pair locks: live holder → busy, dead holder / expired / same run → taken over;
* a full disk (a file-size limit) or a failing done.json: nothing partial looks done;
* a resumed batch after one input changed re-runs that pair only;
* static shards from ``--shard`` / SLURM / torchrun, invalid ones refused in one line;
* one worker per GPU, pinned with CUDA_VISIBLE_DEVICES;
* ``avsm status``: failed, running and missing pairs.

The stand-ins for ``register_pair`` are module-level so that worker processes can import them.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from avsm.batch import DONE_NAME, MANIFEST_CSV, MANIFEST_JSON, read_pairs, run_batch
from avsm.errors import AvsmError
from avsm.executors import Shard, parse_shard, shard_from_env
from avsm.io.outputs import OutputTransaction
from avsm.jobs import STATE_DIR, JobLock

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
ENV = {"PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}


# --------------------------------------------------------------------------- stubs


def logging_register(fixed: str, moving: str, out_dir: str, *, moving_labels: str | None = None,
                     fixed_labels: str | None = None, size: int = 1000, device: str = "cpu",
                     progress: bool = True) -> dict[str, Any]:
    """Logs ``<pair> <pid>`` to ``$AVSM_TEST_LOG``, sleeps ``$AVSM_STUB_SLEEP`` s, writes ``out.bin`` atomically.

    Pair ``pkill`` SIGKILLs its own process on its first attempt (marker in ``$AVSM_TEST_MARKS``),
    ``pdie`` on every attempt, ``pbig`` writes 1 MB, ``phang`` (or ``$AVSM_STUB_HANG``) hangs (10 minutes).
    """
    name = os.path.basename(out_dir)
    with open(os.environ["AVSM_TEST_LOG"], "a") as fh:
        fh.write(f"{name} {os.getpid()}\n")
    marks = os.environ.get("AVSM_TEST_MARKS")
    if name == "pdie" or (name == "pkill" and marks and not os.path.exists(os.path.join(marks, name))):
        if marks:
            open(os.path.join(marks, name), "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    hang = name == os.environ.get("AVSM_STUB_HANG", "phang")
    time.sleep(600.0 if hang else float(os.environ.get("AVSM_STUB_SLEEP", "0")))
    with open(moving, "rb") as fh:
        data = fh.read()
    n = 1 << 20 if name == "pbig" else size
    with OutputTransaction(inputs=[fixed, moving]) as tx:
        with open(tx.path(os.path.join(out_dir, "out.bin")), "wb") as fh:
            fh.write((data * (n // max(1, len(data)) + 1))[:n])
    return {"method": "stub", "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
            "device": device}


# --------------------------------------------------------------------------- helpers


def make_pairs(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fixed.nii.gz").write_bytes(b"template" * 50)
    rows = []
    for n in names:
        (folder / f"{n}.nii.gz").write_bytes(f"moving-{n}".encode() * 50)
        rows.append(f"{n}.nii.gz,fixed.nii.gz,{n}")
    (folder / "pairs.csv").write_text("moving,fixed,name\n" + "\n".join(rows) + "\n")
    return folder / "pairs.csv"


def registrations(log: Path) -> list[str]:
    return [ln.split()[0] for ln in log.read_text().splitlines()] if log.exists() else []


def manifest(out: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads((out / MANIFEST_JSON).read_text())["pairs"]}


@pytest.fixture()
def stub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("AVSM_TEST_LOG", str(log))
    (tmp_path / "marks").mkdir()
    monkeypatch.setenv("AVSM_TEST_MARKS", str(tmp_path / "marks"))
    monkeypatch.setenv("AVSM_STUB_SLEEP", "0")
    for v in ("SLURM_ARRAY_TASK_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(v, raising=False)
    return log


# --------------------------------------------------------------------------- shards


def test_shard_parsing_and_environment() -> None:
    assert parse_shard("2/5") == Shard(2, 5, "--shard") and parse_shard(" 0 / 1 ").count == 1
    for bad in ("5/5", "1/0", "-1/4", "a/b", "3", "", "1/2/3"):
        with pytest.raises(AvsmError, match="invalid --shard"):
            parse_shard(bad)
    assert shard_from_env({}) == Shard(0, 1, "default")
    # --array=1-10: task 1 is shard 0
    s = shard_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "10",
                        "SLURM_ARRAY_TASK_COUNT": "10"})
    assert (s.index, s.count) == (0, 10)
    # --array=0-8:2 (0,2,4,6,8), COUNT missing: from MAX and STEP
    s = shard_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "8",
                        "SLURM_ARRAY_TASK_STEP": "2"})
    assert (s.index, s.count) == (3, 5)
    with pytest.raises(AvsmError, match="contiguous"):  # --array=1,5,9
        shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
                        "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(AvsmError, match="SLURM_ARRAY_TASK_ID"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "x"})
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4, "RANK/WORLD_SIZE")
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}).count == 1
    # torchrun inside an array task: nested shards
    s = shard_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"})
    assert (s.index, s.count) == (3, 6)
    with pytest.raises(AvsmError, match="RANK"):
        shard_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          stub_env: Path) -> None:
    from avsm.cli.main import main

    csv_path = make_pairs(tmp_path / "in", ["p0", "p1"])
    base = ["register", "--pairs", str(csv_path), "--out-dir", str(tmp_path / "out")]
    dask = pytest.importorskip("dask")

    cases = [
        (["--shard", "2/2"], "invalid --shard '2/2'"),
        (["--shard", "x"], "invalid --shard"),
        (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler"),
        (["--fixed", str(csv_path)], "drop --fixed"),
    ]
    for extra, words in cases:
        capsys.readouterr()
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            t0 = time.monotonic()
            assert main(base + extra + ["--quiet"]) == 2
            assert time.monotonic() - t0 < 20
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    for text, words in (("moving,name\na,b\n", "lacks column(s) fixed"),
                        ("moving,fixed,name\na,b,x\nc,d,x\n", "row 3: duplicate pair name 'x' (also row 2)"),
                        ("# note\nmoving,fixed,moving_label\na,b,c\n", "did you mean 'moving_labels'"),
                        ("moving,fixed\n\n,b\n", "row 3: the moving and fixed paths are required")):
        csv_path.write_text(text)
        capsys.readouterr()
        assert main(base + ["--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "pairs.csv" in err and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------- missing file, status


def test_missing_file_row_named_others_run_and_status(tmp_path: Path, stub_env: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from avsm.cli.main import main

    csv_path = make_pairs(tmp_path / "in", ["p0", "p1", "p2", "p3"])
    (tmp_path / "in" / "p1.nii.gz").unlink()
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        recs = run_batch(str(csv_path), str(out), register_one=logging_register, progress=False, shard="0/2")
    assert [(r["name"], r["status"]) for r in recs] == [("p0", "done"), ("p2", "done")]
    recs = run_batch(str(csv_path), str(out), register_one=logging_register, progress=False, shard="1/2")
    assert [(r["name"], r["status"]) for r in recs] == [("p1", "failed"), ("p3", "done")]
    assert "p1.nii.gz" in recs[0]["error"] and "not found" in recs[0]["error"]
    assert any("pairs.csv row 3 (p1)" in m and "p1.nii.gz" in m for m in caplog.messages)
    # status: the failed pair with its reason, then one pair missing after the CSV grows
    capsys.readouterr()
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert "4 pairs: 3 done, 1 failed, 0 running, 0 missing" in text and "failed p1: " in text
    rows = {r["name"]: r for r in csv.DictReader(open(out / MANIFEST_CSV))}
    assert rows["p1"]["status"] == "failed" and "not found" in rows["p1"]["error"]
    with open(csv_path, "a") as fh:
        fh.write("p0.nii.gz,fixed.nii.gz,p4\n")
    run_batch(str(csv_path), str(out), register_one=logging_register, progress=False, shard="0/3")  # p0, p3
    lock = out / STATE_DIR / "locks" / "p4.lock"  # a live process (this one) registers p4
    held, _ = JobLock.acquire(str(lock))
    assert held is not None
    try:
        capsys.readouterr()
        assert main(["status", str(out)]) == 1
        text = capsys.readouterr().out
        assert "5 pairs: 3 done, 1 failed, 1 running, 0 missing" in text, text
        assert "running p4: being run by" in text
    finally:
        held.release()
    # p4 was never run (shard 0/3 took p0 and p3): missing
    capsys.readouterr()
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert "missing p4" in text and "failed p1" in text
    assert registrations(stub_env).count("p0") == 1  # resumed shards skip what is done


# --------------------------------------------------------------------------- locks


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_locks_busy_stale_and_takeover(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "locks" / "x.lock")
    os.makedirs(os.path.dirname(path))
    # a live holder on this host: busy
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(path, "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": sleeper.pid, "token": "t1", "time": time.time()}, fh)
        lock, holder = JobLock.acquire(path)
        assert lock is None and holder["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same holder, now dead: taken over, and the attempt counts on
    with open(path, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": _dead_pid(), "token": "t2", "attempt": 1}, fh)
    lock, prev = JobLock.acquire(path)
    assert lock is not None and prev["token"] == "t2" and lock.info["attempt"] == 2
    lock.release()
    assert not os.path.exists(path)
    # another host: busy while refreshed, taken over once older than the timeout or from the same run
    with open(path, "w") as fh:
        json.dump({"host": "elsewhere", "pid": 1, "token": "t3", "run_id": "r1"}, fh)
    assert JobLock.acquire(path, timeout_s=600)[0] is None
    lock, prev = JobLock.acquire(path, timeout_s=600, run_id="r1")  # a retry of the same run
    assert lock is not None and prev["token"] == "t3"
    lock.release()
    with open(path, "w") as fh:
        json.dump({"host": "elsewhere", "pid": 1, "token": "t4"}, fh)
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock, prev = JobLock.acquire(path, timeout_s=600)
    assert lock is not None and prev["token"] == "t4"
    # held: a second acquire in this process sees a live holder; the heartbeat keeps it fresh
    assert JobLock.acquire(path, timeout_s=600)[0] is None
    lock.release()


def test_nested_and_flat_job_names_never_share_state(tmp_path: Path) -> None:
    """``a/b`` and ``a__b`` are different pairs: their locks and failure records are different files."""
    from avsm.jobs import Job, _state_path, job_dir, record_failure

    root = str(tmp_path)
    names = ["a/b", "a__b", "a_2Fb", "a+b", "a_2Bb"]
    paths = {_state_path(root, "locks", n, ".lock") for n in names}
    assert len(paths) == len(names)
    assert all(os.path.dirname(p) == os.path.join(root, STATE_DIR, "locks") for p in paths)
    assert job_dir(root, "a/b") != job_dir(root, "a__b")
    for n in ("a/b", "a__b"):
        record_failure(root, Job(name=n, inputs=(), work=_noop, key="k"), f"error of {n}")
    recs = sorted(os.listdir(os.path.join(root, STATE_DIR, "failed")))
    assert len(recs) == 2
    got = {json.load(open(os.path.join(root, STATE_DIR, "failed", r)))["name"] for r in recs}
    assert got == {"a/b", "a__b"}


def _noop(*_: Any, **__: Any) -> None:
    return None


def test_two_processes_one_output_folder_each_pair_once(tmp_path: Path, stub_env: Path) -> None:
    names = [f"p{i}" for i in range(8)]
    csv_path = make_pairs(tmp_path / "in", names)
    out = tmp_path / "out"
    code = ("import json; from avsm.batch import run_batch; from test_batch_faults import logging_register; "
            f"r = run_batch({str(csv_path)!r}, {str(out)!r}, register_one=logging_register, progress=False); "
            "print(json.dumps({x['name']: x['status'] for x in r}))")
    env = {**os.environ, **ENV, "AVSM_STUB_SLEEP": "0.4"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se
        results.append(json.loads(so.strip().splitlines()[-1]))
    calls = registrations(stub_env)
    assert sorted(calls) == sorted(names)  # every pair registered exactly once
    for r in results:
        assert set(r.values()) <= {"done", "skipped", "busy"}
    assert {n for r in results for n, s in r.items() if s == "done"} == set(names)
    assert all(m["status"] in ("done", "skipped") for m in manifest(out).values())
    assert not list((out / STATE_DIR / "locks").glob("*.lock"))


# --------------------------------------------------------------------------- killed workers


def test_sigkill_one_local_worker_mid_batch(tmp_path: Path, stub_env: Path) -> None:
    """SIGKILL the worker process registering p2 (from outside): p2 is retried, every other pair is done."""
    names = [f"p{i}" for i in range(5)]
    csv_path = make_pairs(tmp_path / "in", names)
    out = tmp_path / "out"
    code = ("from avsm.batch import run_batch; from test_batch_faults import logging_register; "
            f"run_batch({str(csv_path)!r}, {str(out)!r}, register_one=logging_register, workers=2, threads=1, "
            "progress=False)")
    env = {**os.environ, **ENV, "AVSM_STUB_SLEEP": "1.5"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    lock = out / STATE_DIR / "locks" / "p2.lock"
    victim = None
    try:
        deadline = time.monotonic() + 90
        while victim is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "p2 never started"
            try:
                info = json.loads(lock.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if "p2" in registrations(stub_env):  # the registration itself has started
                victim = int(info["pid"])
            else:
                time.sleep(0.05)
        assert victim not in (proc.pid, os.getpid())
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    m = manifest(out)
    assert {n: r["status"] for n, r in m.items()} == {n: "done" for n in names}
    assert m["p2"]["attempts"] == 2 and all(m[n]["attempts"] == 1 for n in names if n != "p2")
    calls = registrations(stub_env)
    assert calls.count("p2") == 2 and all(calls.count(n) == 1 for n in names if n != "p2")
    assert "SIGKILL" in err and "p2" in err


def test_worker_killed_every_time_is_recorded_with_reason(tmp_path: Path, stub_env: Path) -> None:
    csv_path = make_pairs(tmp_path / "in", ["p0", "pkill", "pdie", "p3"])
    out = tmp_path / "out"
    recs = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register, workers=2,
                                            threads=1, progress=False)}
    assert {n: r["status"] for n, r in recs.items()} == {"p0": "done", "pkill": "done", "pdie": "failed",
                                                         "p3": "done"}
    assert recs["pkill"]["attempts"] == 2
    assert "killed by SIGKILL" in recs["pdie"]["error"] and recs["pdie"]["attempts"] == 2
    assert registrations(stub_env).count("pdie") == 2
    assert not (out / "pdie" / DONE_NAME).exists()
    failed = json.loads((out / STATE_DIR / "failed" / "pdie.json").read_text())
    assert "SIGKILL" in failed["error"] and failed["fingerprint"]
    assert manifest(out)["pdie"]["status"] == "failed"


# --------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("workers", [1, 2])
def test_job_timeout_stops_a_hung_pair_and_the_others_finish(tmp_path: Path, stub_env: Path, workers: int) -> None:
    """A pair that hangs is stopped after --job-timeout and recorded with the reason, once (not
    retried); the other pairs are done; a rerun without the hang registers only that pair."""
    names = ["p0", "phang", "p2", "p3"]
    csv_path = make_pairs(tmp_path / "in", names)
    out = tmp_path / "out"
    t0 = time.monotonic()
    recs = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                             workers=workers, threads=1, progress=False, job_timeout_s=4.0)}
    took = time.monotonic() - t0
    assert took < 90, took
    assert recs["phang"]["status"] == "failed" and "timed out after 4 s" in recs["phang"]["error"]
    assert all(recs[n]["status"] == "done" for n in names if n != "phang")
    assert registrations(stub_env).count("phang") == 1
    m = manifest(out)
    assert m["phang"]["status"] == "failed" and "timed out" in m["phang"]["error"]
    assert not (out / "phang" / DONE_NAME).exists()
    # the killed worker's stale lock does not block a rerun (the hang gone): that pair alone runs
    os.environ["AVSM_STUB_HANG"] = "none"
    try:
        recs2 = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                                  workers=1, threads=1, progress=False)}
    finally:
        del os.environ["AVSM_STUB_HANG"]
    assert recs2["phang"]["status"] == "done" and all(recs2[n]["status"] == "skipped" for n in names
                                                      if n != "phang")
    assert registrations(stub_env).count("phang") == 2


def test_job_timeout_bad_values_and_dask(tmp_path: Path, stub_env: Path) -> None:
    from avsm.cli.main import main

    csv_path = make_pairs(tmp_path / "in", ["p0"])
    for bad in ("0", "-3", "soon"):
        with pytest.raises(SystemExit) as e:
            main(["register", "--pairs", str(csv_path), "--out-dir", str(tmp_path / "o"), "--job-timeout", bad])
        assert e.value.code == 2
    with pytest.raises(AvsmError, match="local workers only"):
        run_batch(str(csv_path), str(tmp_path / "o"), register_one=logging_register, scheduler="dask",
                  progress=False, job_timeout_s=5.0)
    assert not (tmp_path / "o" / "p0" / DONE_NAME).exists()


def test_full_disk_leaves_no_pair_looking_done(tmp_path: Path, stub_env: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """Writes beyond a file-size limit fail (EFBIG, as a full disk fails with ENOSPC): the pair fails with
    the reason, no partial output and no done.json; the others finish; a rerun completes it."""
    csv_path = make_pairs(tmp_path / "in", ["p0", "pbig", "p2"])
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        recs = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                                progress=False)}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert recs["pbig"]["status"] == "failed" and "too large" in recs["pbig"]["error"].lower()
    assert recs["p0"]["status"] == recs["p2"]["status"] == "done"
    assert not (out / "pbig" / DONE_NAME).exists() and not list((out / "pbig").glob("*"))
    assert not list(out.rglob(".avsm-tmp-*"))
    # done.json itself cannot be written (ENOSPC): the outputs exist but the pair is not done
    import avsm.jobs as J

    real = J.atomic_write_text

    def full(path: Any, text: str, **kw: Any) -> None:
        if str(path).endswith(DONE_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text, **kw)

    monkeypatch.setattr(J, "atomic_write_text", full)
    recs = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                            progress=False)}
    assert recs["pbig"]["status"] == "failed" and "no space left" in recs["pbig"]["error"].lower()
    assert (out / "pbig" / "out.bin").exists() and not (out / "pbig" / DONE_NAME).exists()
    assert [recs["p0"]["status"], recs["p2"]["status"]] == ["skipped", "skipped"]
    monkeypatch.setattr(J, "atomic_write_text", real)
    recs = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                            progress=False)}
    assert [recs[n]["status"] for n in ("p0", "pbig", "p2")] == ["skipped", "done", "skipped"]
    assert (out / "pbig" / "out.bin").stat().st_size == 1 << 20


# --------------------------------------------------------------------------- resume


def test_resume_after_one_input_changed_reruns_that_pair_only(tmp_path: Path, stub_env: Path) -> None:
    csv_path = make_pairs(tmp_path / "in", ["p0", "p1", "p2"])
    out = tmp_path / "out"
    run_batch(str(csv_path), str(out), register_one=logging_register, progress=False)
    assert sorted(registrations(stub_env)) == ["p0", "p1", "p2"]
    stub_env.unlink()
    (tmp_path / "in" / "p1.nii.gz").write_bytes(b"a new scan of subject 1")
    recs = run_batch(str(csv_path), str(out), register_one=logging_register, progress=False)
    assert [r["status"] for r in recs] == ["skipped", "done", "skipped"]
    assert registrations(stub_env) == ["p1"]
    # the same size and modification time: only a full verification sees the new content
    f = tmp_path / "in" / "p2.nii.gz"
    st = f.stat()
    f.write_bytes(bytes(reversed(f.read_bytes())))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    stub_env.unlink()
    assert [r["status"] for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                           progress=False)] == ["skipped"] * 3
    recs = run_batch(str(csv_path), str(out), register_one=logging_register, progress=False, verify="full")
    assert [r["status"] for r in recs] == ["skipped", "skipped", "done"]
    assert registrations(stub_env) == ["p2"]
    # a changed option re-runs everything; the volatile ones (device, progress, threads) do not
    stub_env.unlink()
    recs = run_batch(str(csv_path), str(out), register_one=logging_register, progress=False, threads=1,
                     device="cpu")
    assert [r["status"] for r in recs] == ["skipped"] * 3
    recs = run_batch(str(csv_path), str(out), register_one=logging_register, progress=False, size=10)
    assert [r["status"] for r in recs] == ["done"] * 3 and (out / "p0" / "out.bin").stat().st_size == 10


# --------------------------------------------------------------------------- GPUs


def test_one_worker_per_gpu_pinned(tmp_path: Path, stub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda with two visible GPUs: two workers, each seeing one GPU (no GPU needed: the stub only
    reports its environment)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("AVSM_STUB_SLEEP", "0.3")
    csv_path = make_pairs(tmp_path / "in", [f"p{i}" for i in range(4)])
    recs = run_batch(str(csv_path), str(tmp_path / "out"), register_one=logging_register, progress=False,
                     device="cuda", threads=1)
    assert all(r["status"] == "done" for r in recs)
    seen: dict[str, set[int]] = {}
    for r in recs:
        assert r["summary"]["device"] == "cuda"
        seen.setdefault(r["summary"]["cuda_visible"], set()).add(r["summary"]["pid"])
    assert set(seen) == {"3", "5"}
    assert not (seen["3"] & seen["5"])  # different processes


def test_read_pairs_columns(tmp_path: Path) -> None:
    """The one pairs.csv reader: id accepted for name, masks and label_mapping columns, defaults, comments."""
    (tmp_path / "pairs.csv").write_text(
        "# cohort\nid,moving,fixed,fixed_mask,label_mapping,notes\ns1,m1.nii.gz,t.nii.gz,,,x\n"
        "# skipped\ns2,m2.nii.gz,t.nii.gz,own_mask.nii.gz,own.csv,y\n")
    pairs = read_pairs(tmp_path / "pairs.csv", label_mapping="map.csv", fixed_mask="mask.nii.gz")
    assert [p.name for p in pairs] == ["s1", "s2"] and [p.row for p in pairs] == [3, 5]
    assert pairs[0].fixed_mask == os.path.abspath("mask.nii.gz")
    assert pairs[0].label_mapping == os.path.abspath("map.csv")
    assert pairs[1].fixed_mask == str(tmp_path / "own_mask.nii.gz")
    assert pairs[1].label_mapping == str(tmp_path / "own.csv")
    assert pairs[0].moving_mask is None and set(pairs[1].inputs) == {"moving", "fixed", "fixed_mask", "label_mapping"}
    (tmp_path / "pairs.csv").write_text("name,id,moving,fixed\na,b,c,d\n")
    with pytest.raises(AvsmError, match="both 'name' and 'id'"):
        read_pairs(tmp_path / "pairs.csv")
