"""The evaluation harness: rows, resume, sharding over ranks, CLI and summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import avsm
from avsm.baselines.base import REGISTRY, register_method
from avsm.eval.pairs import Pair, read_pairs, write_pairs
from avsm.eval.runner import EvalConfig, evaluate, plan_jobs, row_path

DATA = os.path.join(os.path.dirname(__file__), "data")
SRC = os.path.dirname(os.path.dirname(os.path.abspath(avsm.__file__)))
VOLATILE = {"time_s", "time_reverse_s", "peak_rss_mb", "rss_start_mb", "memory_method", "timings"}


def _shrink(src: str, dst: str, label: bool, shift: float = 0.0) -> None:
    img = sitk.ReadImage(src)
    ref = sitk.Image([20, 24, 20], img.GetPixelID())
    ref.SetSpacing([8.0, 8.0, 8.0])
    ref.SetDirection(img.GetDirection())
    o = np.array(img.GetOrigin()) + np.array(img.GetDirection()).reshape(3, 3) @ np.array([4.0, 4.0, 4.0])
    ref.SetOrigin(tuple(o + np.array([shift, 0.0, 0.0])))
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), interp, 0.0), dst)


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("pairs")
    for name, src, shift in (("a", "mni_4mm", 0.0), ("b", "colin_4mm", 0.0), ("c", "colin_4mm", 6.0)):
        _shrink(os.path.join(DATA, f"{src}.nii.gz"), str(d / f"{name}.nii.gz"), False, shift)
        _shrink(os.path.join(DATA, f"{src}_labels.nii.gz"), str(d / f"{name}_l.nii.gz"), True, shift)
    rows = [("b", "a"), ("a", "b"), ("c", "a"), ("a", "c")]
    with open(d / "pairs.csv", "w") as fh:
        fh.write("moving,fixed,moving_labels,fixed_labels\n")
        for m, f in rows:
            fh.write(f"{m}.nii.gz,{f}.nii.gz,{m}_l.nii.gz,{f}_l.nii.gz\n")
    return str(d / "pairs.csv")


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _stable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_plan_groups_reverse_pairs(tiny_pairs: str) -> None:
    pairs = read_pairs(tiny_pairs)
    jobs = plan_jobs(pairs, ["identity", "x"])
    assert [j.pairs for j in jobs] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert not any(j.extra_reverse for j in jobs)
    solo = plan_jobs(pairs[:1], ["identity"])
    assert solo[0].extra_reverse


def test_rows_and_resume_skips_finished(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    calls: list[tuple[str, str]] = []
    from avsm.baselines.avsm_methods import identity

    def counting(fixed, moving, **opts):  # noqa: ANN001, ANN202
        calls.append((fixed.path, moving.path))
        return identity(fixed, moving, **opts)

    register_method("counting-identity", counting)
    try:
        pairs = read_pairs(tiny_pairs)
        out = str(tmp_path / "out")
        cfg = EvalConfig(methods=["counting-identity"], out_dir=out, isolate=False, spacing=8.0, border=2)
        rows = evaluate(pairs, cfg, rank=0, world=1, progress=False)
        assert rows is not None and len(rows) == 4 and all(r["status"] == "ok" for r in rows)
        assert len(calls) == 4
        r0 = rows[0]
        assert 0 < r0["dice_mean"] <= 1 and r0["folds"] == 0 and r0["inv_consistency"] < -10
        assert len(json.loads(r0["dice_per_label"])) == r0["n_labels"] == 12
        # a second run computes nothing
        calls.clear()
        evaluate(pairs, cfg, rank=0, world=1, progress=False)
        assert calls == []
        # interrupted run: one row missing -> only that job reruns, the other row is kept as is
        keep = row_path(out, "counting-identity", "0")
        before = open(keep).read()
        os.unlink(row_path(out, "counting-identity", "1"))
        rows2 = evaluate(pairs, cfg, rank=0, world=1, progress=False)
        assert len(calls) == 2 and open(keep).read() == before
        assert _stable([{k: str(v) for k, v in r.items()} for r in rows2]) == \
            _stable([{k: str(v) for k, v in r.items()} for r in rows])
        summ = _read_csv(os.path.join(out, "summary.csv"))
        assert summ[0]["method"] == "counting-identity" and summ[0]["n"] == "4"
        assert "| counting-identity | 4 |" in open(os.path.join(out, "summary.md")).read()
    finally:
        REGISTRY.pop("counting-identity", None)


def test_failing_method_is_recorded(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    def broken(fixed, moving, **opts):  # noqa: ANN001, ANN202
        raise RuntimeError("no model")

    register_method("broken", broken)
    try:
        out = str(tmp_path / "o")
        rows = evaluate(read_pairs(tiny_pairs)[:2], EvalConfig(["broken"], out, isolate=False), rank=0, world=1,
                        progress=False)
        assert rows and all(r["status"] == "error" and "no model" in r["error"] for r in rows)
    finally:
        REGISTRY.pop("broken", None)


def _cli(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", "avsm.cli.main", "evaluate", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace")


def test_two_ranks_equal_one_rank(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    common = ["--pairs", tiny_pairs, "--methods", "identity,sitk-affine", "--spacing", "8", "--border", "2",
              "--in-process", "--threads", "1"]
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    p = _cli(common + ["--out-dir", one], {})
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "| identity | 4 |" in out
    procs = [_cli(common + ["--out-dir", two], {"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    for q in procs:
        _, err = q.communicate(timeout=600)
        assert q.returncode == 0, err
    r1 = _read_csv(os.path.join(one, "results.csv"))
    r2 = _read_csv(os.path.join(two, "results.csv"))
    assert len(r1) == 8
    assert _stable(r1) == _stable(r2)
    # each rank did its own share: rank 1 wrote half the rows
    assert len(os.listdir(os.path.join(two, "rows"))) == 8


def test_isolated_worker_reports_memory(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    pairs = read_pairs(tiny_pairs)[:2]
    out = str(tmp_path / "iso")
    rows = evaluate(pairs, EvalConfig(["identity"], out, spacing=8.0, border=2, isolate=True), rank=0, world=1,
                    progress=False)
    assert rows and all(r["status"] == "ok" for r in rows)
    assert rows[0]["peak_rss_mb"] > 50 and "fresh subprocess" in rows[0]["memory_method"]


def test_pairs_io_roundtrip(tmp_path: os.PathLike) -> None:
    ps = [Pair("x", "/m.nii.gz", "/f.nii.gz", None, None, None)]
    path = str(tmp_path / "p.csv")
    write_pairs(ps, path)
    assert read_pairs(path) == ps


def test_qc_figures_and_boxplot(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    out = str(tmp_path / "qc")
    cfg = EvalConfig(["identity"], out, spacing=8.0, border=2, isolate=False, qc=True)
    evaluate(read_pairs(tiny_pairs)[:2], cfg, rank=0, world=1, progress=False)
    files = sorted(os.listdir(os.path.join(out, "qc")))
    assert files == ["identity__0_detj.png", "identity__0_pair.png", "identity__1_detj.png", "identity__1_pair.png"]
    assert os.path.getsize(os.path.join(out, "dice_boxplot.png")) > 5000
