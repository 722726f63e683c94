"""The evaluation harness: rows, fingerprinted resume, shards merged by ``avsm status``, CLI exit codes,
the one Dice rule and the one label-mapping reader."""

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
from avsm.eval.runner import EvalConfig, evaluate, plan_jobs

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
    return [{k: v for k, v in r.items() if k not in VOLATILE and k != "job_fingerprint"} for r in rows]


def row_file(out: str, method: str, pair: str) -> str:
    """The row file of ``method`` on ``pair`` (``rows/<method>/<first pair of the job>/<pair>.json``)."""
    import glob

    found = glob.glob(os.path.join(out, "rows", method, "*", f"{pair}.json"))
    assert len(found) == 1, found
    return found[0]


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
        assert [p.name for p in pairs] == ["b_to_a", "a_to_b", "c_to_a", "a_to_c"]
        out = str(tmp_path / "out")
        cfg = EvalConfig(methods=["counting-identity"], out_dir=out, isolate=False, spacing=8.0, border=2)
        rows = evaluate(pairs, cfg, rank=0, world=1, progress=False)
        assert rows is not None and len(rows) == 4 and all(r["status"] == "ok" for r in rows)
        assert len(calls) == 4
        r0 = rows[0]
        assert 0 < r0["dice_mean"] <= 1 and r0["folds"] == 0 and r0["inv_consistency"] < -10
        assert len(json.loads(r0["dice_per_label"])) == r0["n_labels"] == 12
        assert r0["threads"] >= 1
        # a second run computes nothing
        calls.clear()
        evaluate(pairs, cfg, rank=0, world=1, progress=False)
        assert calls == []
        # interrupted run: one row file missing -> only its job (that pair and its reverse) reruns
        os.unlink(row_file(out, "counting-identity", "a_to_b"))
        rows2 = evaluate(pairs, cfg, rank=0, world=1, progress=False)
        assert len(calls) == 2 and {c[0] for c in calls} == {p.fixed for p in pairs[:2]}
        assert _stable([{k: str(v) for k, v in r.items()} for r in rows2]) == \
            _stable([{k: str(v) for k, v in r.items()} for r in rows])
        # a changed option recomputes every job of the method
        calls.clear()
        evaluate(pairs, EvalConfig(methods=["counting-identity"], out_dir=out, isolate=False, spacing=8.0,
                                   border=3), rank=0, world=1, progress=False)
        assert len(calls) == 4
        summ = _read_csv(os.path.join(out, "summary.csv"))
        assert summ[0]["method"] == "counting-identity" and summ[0]["n"] == "4"
        assert "| counting-identity | 4 |" in open(os.path.join(out, "summary.md")).read()
    finally:
        REGISTRY.pop("counting-identity", None)


def test_changed_input_or_edited_csv_recomputes_that_job_only(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    """Rows are fingerprinted by input contents: an edited pairs.csv (same name, other image) or a changed
    label map recomputes exactly the jobs that use it, never reuses an old row."""
    import shutil

    d = tmp_path / "in"
    shutil.copytree(os.path.dirname(tiny_pairs), d)
    (d / "pairs.csv").write_text("name,moving,fixed,moving_labels,fixed_labels\n"
                                 "x,b.nii.gz,a.nii.gz,b_l.nii.gz,a_l.nii.gz\n"
                                 "y,c.nii.gz,a.nii.gz,c_l.nii.gz,a_l.nii.gz\n")
    out = str(tmp_path / "out")
    cfg = EvalConfig(methods=["identity"], out_dir=out, isolate=False, spacing=8.0, border=2, consistency=False,
                     hd95=False)
    first = {r["pair_id"]: r for r in evaluate(read_pairs(str(d / "pairs.csv")), cfg, rank=0, world=1,
                                               progress=False)}
    mtimes = {n: os.stat(row_file(out, "identity", n)).st_mtime_ns for n in "xy"}
    # row x now registers c -> a: its old row must not be reused
    (d / "pairs.csv").write_text("name,moving,fixed,moving_labels,fixed_labels\n"
                                 "x,c.nii.gz,a.nii.gz,c_l.nii.gz,a_l.nii.gz\n"
                                 "y,c.nii.gz,a.nii.gz,c_l.nii.gz,a_l.nii.gz\n")
    second = {r["pair_id"]: r for r in evaluate(read_pairs(str(d / "pairs.csv")), cfg, rank=0, world=1,
                                                progress=False)}
    assert os.stat(row_file(out, "identity", "y")).st_mtime_ns == mtimes["y"]
    assert os.stat(row_file(out, "identity", "x")).st_mtime_ns != mtimes["x"]
    assert second["x"]["moving"].endswith("c.nii.gz") and second["x"]["dice_mean"] == first["y"]["dice_mean"]
    assert second["x"]["dice_mean"] != first["x"]["dice_mean"]


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


def test_two_shards_equal_one_run(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    """--shard 0/2 and 1/2 run side by side without a barrier; avsm status merges them into the
    results of one run.  A missing image fails its jobs (named), the others finish, exit status 1."""
    import shutil

    d = tmp_path / "in"
    shutil.copytree(os.path.dirname(tiny_pairs), d)
    with open(d / "pairs.csv", "a") as fh:
        fh.write("gone.nii.gz,a.nii.gz,b_l.nii.gz,a_l.nii.gz\n")
    common = ["--pairs", str(d / "pairs.csv"), "--methods", "identity,sitk-affine", "--spacing", "8", "--border",
              "2", "--in-process", "--threads", "1"]
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    p = _cli(common + ["--out-dir", one], {})
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, err
    assert "| identity | 4 (+1 failed) |" in out and "gone.nii.gz" in out
    procs = [_cli(common + ["--out-dir", two, "--shard", f"{r}/2"], {}) for r in range(2)]
    for q in procs:
        _, err = q.communicate(timeout=600)
        assert q.returncode in (0, 1), err
    assert not os.path.exists(os.path.join(two, "results.csv"))
    st = subprocess.run([sys.executable, "-m", "avsm.cli.main", "status", two], capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": SRC})
    assert st.returncode == 1 and "failed" in st.stdout and "gone.nii.gz" in st.stdout, st.stdout + st.stderr
    r1 = _read_csv(os.path.join(one, "results.csv"))
    r2 = _read_csv(os.path.join(two, "results.csv"))
    assert len(r1) == 10 and sum(r["status"] == "ok" for r in r1) == 8
    assert _stable(r1) == _stable(r2)


def test_label_mapping_header_optional_and_dice_over_shared_labels(tmp_path: os.PathLike) -> None:
    """One reader: a headerless mapping keeps its first row.  One Dice rule: without a mapping, labels
    present in both maps (not the union); with one, the mapped labels."""
    from avsm.labels import read_label_mapping, scored_labels

    (tmp_path / "h.csv").write_text("fixed,moving,name\n1,11,a\n2,12,b\n")
    (tmp_path / "n.csv").write_text("1,11\n2,12\n")
    assert read_label_mapping(str(tmp_path / "h.csv")) == read_label_mapping(str(tmp_path / "n.csv")) == {1: 11, 2: 12}
    f = np.array([0, 1, 2, 3])
    m = np.array([0, 1, 2, 4])
    assert scored_labels(f, m) == [1, 2]
    assert scored_labels(f, m, {1: 11, 5: 15, 9: 0}) == [1, 5]
    # evaluate: identity on two label maps with one label each of their own
    grid = dict(spacing=(4.0, 4.0, 4.0))
    a = np.zeros((8, 8, 8), np.uint8)
    a[1:4, 1:7, 1:7], a[4:7, 1:7, 1:7] = 1, 2
    b = a.copy()
    a[0, 0, 0], b[7, 7, 7] = 3, 4  # 3 only fixed, 4 only moving
    for name, arr in (("f", a), ("m", b)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(grid["spacing"])
        sitk.WriteImage(img, str(tmp_path / f"{name}_l.nii.gz"))
        im = sitk.GetImageFromArray((arr > 0).astype(np.float32) * 100 + 1)
        im.SetSpacing(grid["spacing"])
        sitk.WriteImage(im, str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "pairs.csv").write_text("moving,fixed,moving_labels,fixed_labels\n"
                                        "m.nii.gz,f.nii.gz,m_l.nii.gz,f_l.nii.gz\n")
    cfg = EvalConfig(["identity"], str(tmp_path / "o"), isolate=False, spacing=4.0, border=1, consistency=False,
                     hd95=False)
    rows = evaluate(read_pairs(str(tmp_path / "pairs.csv")), cfg, rank=0, world=1, progress=False)
    assert rows[0]["n_labels"] == 2 and rows[0]["dice_mean"] == pytest.approx(1.0)
    rows = evaluate(read_pairs(str(tmp_path / "pairs.csv"), label_mapping=str(tmp_path / "n.csv")), cfg,
                    rank=0, world=1, progress=False)
    assert rows[0]["n_labels"] == 2 and json.loads(rows[0]["dice_per_label"]) == {"1": 0.0, "2": 0.0}


def test_isolated_worker_reports_memory(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    pairs = read_pairs(tiny_pairs)[:2]
    out = str(tmp_path / "iso")
    rows = evaluate(pairs, EvalConfig(["identity"], out, spacing=8.0, border=2, isolate=True), rank=0, world=1,
                    progress=False)
    assert rows and all(r["status"] == "ok" for r in rows)
    assert rows[0]["peak_rss_mb"] > 50 and "fresh subprocess" in rows[0]["memory_method"]
    assert rows[0]["rss_start_mb"] < rows[0]["peak_rss_mb"]


def test_pairs_io_roundtrip(tmp_path: os.PathLike) -> None:
    ps = [Pair("x", "/m.nii.gz", "/f.nii.gz", None, None, None), Pair("y", "/m.nii.gz", "/g.nii.gz", "/ml.nii.gz",
                                                                   None, "/map.csv", "/fm.nii.gz", None)]
    path = str(tmp_path / "p.csv")
    write_pairs(ps, path)
    assert read_pairs(path) == ps


def test_qc_figures_and_boxplot(tiny_pairs: str, tmp_path: os.PathLike) -> None:
    out = str(tmp_path / "qc")
    cfg = EvalConfig(["identity"], out, spacing=8.0, border=2, isolate=False, qc=True)
    evaluate(read_pairs(tiny_pairs)[:2], cfg, rank=0, world=1, progress=False)
    files = sorted(os.listdir(os.path.join(out, "qc")))
    assert files == ["identity__a_to_b_detj.png", "identity__a_to_b_pair.png", "identity__b_to_a_detj.png",
                     "identity__b_to_a_pair.png"]
    assert os.path.getsize(os.path.join(out, "dice_boxplot.png")) > 5000
