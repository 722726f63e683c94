"""The Dask engine: ``--scheduler dask`` (a LocalCluster of 2 worker processes, 1 thread each) and
``--scheduler ADDRESS`` (an existing cluster); results as they finish; a killed worker's pair retried once."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from test_batch_faults import logging_register, make_pairs, manifest, registrations  # noqa: E402

from avsm.batch import run_batch  # noqa: E402
from avsm.jobs import STATE_DIR  # noqa: E402


@pytest.fixture()
def stub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("AVSM_TEST_LOG", str(log))
    (tmp_path / "marks").mkdir()
    monkeypatch.setenv("AVSM_TEST_MARKS", str(tmp_path / "marks"))
    monkeypatch.setenv("AVSM_STUB_SLEEP", "0.2")
    for v in ("SLURM_ARRAY_TASK_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(v, raising=False)
    return log


def test_dask_local_cluster_kills_and_retries(tmp_path: Path, stub_env: Path) -> None:
    """``scheduler="dask"``: 2 worker processes.  A worker SIGKILLed mid-pair (pkill, first attempt) costs that
    pair one attempt and it is done on the retry; a pair whose worker dies every time (pdie) is recorded
    failed with the reason; every other pair is done, identical to a serial run."""
    names = ["p0", "pkill", "p2", "pdie", "p4", "p5"]
    csv_path = make_pairs(tmp_path / "in", names)
    out = tmp_path / "out"
    recs = {r["name"]: r for r in run_batch(str(csv_path), str(out), register_one=logging_register,
                                            scheduler="dask", workers=2, threads=1, progress=False)}
    # a result lost with a dying worker is recomputed by Dask: the job then finds itself done ("skipped")
    assert {n: r["status"].replace("skipped", "done") for n, r in recs.items()} == \
        {**{n: "done" for n in names}, "pdie": "failed"}
    assert "Dask worker died" in recs["pdie"]["error"]
    calls = registrations(stub_env)
    assert calls.count("pkill") == 2 and calls.count("pdie") == 2
    assert all(calls.count(n) == 1 for n in names if n not in ("pkill", "pdie"))
    assert recs["pkill"]["attempts"] == 2  # the retry took over the dead worker's lock
    assert all(r["summary"]["pid"] != os.getpid() for r in recs.values() if r["status"] == "done")
    assert manifest(out)["pdie"]["status"] == "failed"
    normal = [n for n in names if n not in ("pkill", "pdie")]
    serial_csv = make_pairs(tmp_path / "in2", normal)  # same inputs (the stub kills whoever runs pdie)
    run_batch(str(serial_csv), str(tmp_path / "serial"), register_one=logging_register, progress=False, threads=1)
    for n in normal:
        a = json.loads((out / n / "done.json").read_text())["files"]
        b = json.loads((tmp_path / "serial" / n / "done.json").read_text())["files"]
        assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()}


def test_dask_existing_cluster_by_address(tmp_path: Path, stub_env: Path) -> None:
    """``scheduler=ADDRESS``: jobs go to a cluster started elsewhere; results arrive as they finish."""
    from distributed import LocalCluster

    names = [f"p{i}" for i in range(4)]
    csv_path = make_pairs(tmp_path / "in", names)
    out = tmp_path / "out"
    order: list[str] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        import avsm.executors as E

        real = E._run_dask

        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            cb = args[7]  # _run_dask(jobs, root, scheduler, workers, threads, max_attempts, kw, cb, timeout)
            args = (*args[:7], lambda rec: (order.append(rec["name"]), cb(rec)), *args[8:])
            return real(*args, **kwargs)

        E._run_dask = spy
        try:
            recs = run_batch(str(csv_path), str(out), register_one=logging_register,
                             scheduler=cluster.scheduler_address, progress=False)
        finally:
            E._run_dask = real
    assert [r["status"] for r in recs] == ["done"] * 4
    assert sorted(order) == names  # each result handed over once, as it finished
    assert all(r["threads"] >= 1 for r in recs)
    assert not list((out / STATE_DIR / "locks").glob("*.lock"))
