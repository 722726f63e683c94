"""Tests of avsm.batch: pairs.csv, resume with verified done.json, per-pair failures,
manifest, worker pool, SLURM-array shards merged by ``avsm status``, label mapping in batch mode.

The stand-ins for ``avsm.pipeline.register_pair`` below are module-level so that
spawned workers and subprocesses can import them (``from test_batch import ...``).
Their outputs are a deterministic function of the input bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from avsm.batch import DONE_NAME, MANIFEST_CSV, MANIFEST_JSON, read_pairs, run_batch, verify_done
from avsm.errors import AvsmError
from avsm.io.outputs import OutputTransaction

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

# --------------------------------------------------------------------------- stubs


def _digest(*paths: str | None) -> bytes:
    h = hashlib.sha256()
    for p in paths:
        if p:
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.digest()


def stub_register(fixed: str, moving: str, out_dir: str, *, moving_labels: str | None = None,
                  fixed_labels: str | None = None, scale: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """Atomic stub: ``warped.bin`` (64 KiB) and ``summary.json``; fails on names containing 'bad'."""
    if "bad" in os.path.basename(moving):
        raise AvsmError("stub cannot register this image", moving)
    d = _digest(fixed, moving, moving_labels, fixed_labels)
    metric = round(d[0] / 255.0 * scale, 6)
    with OutputTransaction(inputs=[p for p in (fixed, moving, moving_labels, fixed_labels) if p]) as tx:
        with open(tx.path(os.path.join(out_dir, "warped.bin")), "wb") as fh:
            fh.write(d * 2048)
        with open(tx.path(os.path.join(out_dir, "summary.json")), "w") as fh:
            json.dump({"method": "stub", "mean_dice": metric}, fh)
    return {"method": "stub", "mean_dice": metric, "progress_seen": progress}


def slow_partial_register(fixed: str, moving: str, out_dir: str, *, moving_labels: str | None = None,
                          fixed_labels: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Non-atomic, slow stub: writes ``a.bin``, sleeps ``$AVSM_STUB_SLEEP`` s, then ``b.bin``.

    A SIGKILL during the sleep leaves a half-finished pair folder behind.
    """
    d = _digest(fixed, moving)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "a.bin"), "wb") as fh:
        fh.write(d * 4096)
        fh.flush()
    time.sleep(float(os.environ.get("AVSM_STUB_SLEEP", "0")))
    with open(os.path.join(out_dir, "b.bin"), "wb") as fh:
        fh.write(d[::-1] * 4096)
    return {"method": "slow", "mean_dice": d[1] / 255.0}


# --------------------------------------------------------------------------- helpers


def make_inputs(folder: Path, n: int = 3, bad: bool = False) -> Path:
    """``n`` fake image files and a pairs.csv (relative paths); with ``bad``, a failing pair."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for role in ("fixed", "moving"):
            (folder / f"{role}{i}.nii.gz").write_bytes(f"{role}-{i}".encode() * 100)
        rows.append((f"moving{i}.nii.gz", f"fixed{i}.nii.gz", f"p{i}"))
    if bad:
        (folder / "bad_moving.nii.gz").write_bytes(b"x" * 10)
        rows.append(("bad_moving.nii.gz", "fixed0.nii.gz", "pbad"))
        rows.append(("missing.nii.gz", "fixed0.nii.gz", "pmissing"))
    csv_path = folder / "pairs.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["moving", "fixed", "name"])
        w.writerows(rows)
    return csv_path


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every result file below ``folder`` (done.json, manifests and the hidden batch state excluded)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
        if p.is_file() and not hidden and p.name not in (DONE_NAME, MANIFEST_CSV, MANIFEST_JSON):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def input_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


# --------------------------------------------------------------------------- tests


def test_read_pairs(tmp_path: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("# comment\nfixed,moving,moving_labels\nf.nii.gz,sub/m.nii.gz,\n"
                        "/abs/f2.nii,m2.nrrd,lab.nii.gz\n")
    pairs = read_pairs(csv_path)
    assert [p.name for p in pairs] == ["m_to_f", "m2_to_f2"]
    assert pairs[0].moving == str(tmp_path / "sub" / "m.nii.gz") and pairs[0].moving_labels is None
    assert pairs[1].fixed == "/abs/f2.nii" and pairs[1].moving_labels == str(tmp_path / "lab.nii.gz")
    for text, words in (("a,b\n1,2\n", "lacks column"), ("moving,fixed\n", "no pairs"),
                        ("moving,fixed,name\na,b,x\nc,d,x\n", "duplicate"),
                        ("moving,fixed\na,\n", "required")):
        csv_path.write_text(text)
        with pytest.raises(AvsmError, match=words) as e:
            read_pairs(csv_path)
        assert "pairs.csv" in str(e.value)
    with pytest.raises(AvsmError, match="cannot read"):
        read_pairs(tmp_path / "nope.csv")


def test_batch_runs_records_failures_and_resumes(tmp_path: Path) -> None:
    csv_path = make_inputs(tmp_path / "in", bad=True)
    before = input_hashes(tmp_path / "in")
    out = tmp_path / "out"
    recs = run_batch(str(csv_path), str(out), register_one=stub_register, progress=False, scale=2.0)
    status = {r["name"]: r["status"] for r in recs}
    assert status == {"p0": "done", "p1": "done", "p2": "done", "pbad": "failed", "pmissing": "failed"}
    errors = {r["name"]: r["error"] for r in recs}
    assert "bad_moving.nii.gz" in errors["pbad"] and "stub cannot register" in errors["pbad"]
    assert "missing.nii.gz" in errors["pmissing"] and "not found" in errors["pmissing"]
    assert all("\n" not in e for e in errors.values())
    assert input_hashes(tmp_path / "in") == before  # inputs untouched
    for name in ("p0", "p1", "p2"):
        done = json.loads((out / name / DONE_NAME).read_text())
        assert set(done["files"]) == {"warped.bin", "summary.json"}
        assert done["summary"]["progress_seen"] is False  # batch silences per-pair bars
    assert not (out / "pbad" / DONE_NAME).exists()
    # manifest
    rows = list(csv.DictReader(open(out / MANIFEST_CSV)))
    assert [r["name"] for r in rows] == ["p0", "p1", "p2", "pbad", "pmissing"]
    assert rows[0]["status"] == "done" and float(rows[0]["mean_dice"]) >= 0 and rows[0]["method"] == "stub"
    assert rows[3]["error"]
    assert len(json.loads((out / MANIFEST_JSON).read_text())["pairs"]) == 5
    hashes = tree_hashes(out)

    # resume: verified pairs are skipped, failures retried
    recs = run_batch(str(csv_path), str(out), register_one=stub_register, progress=False, scale=2.0)
    assert [r["status"] for r in recs] == ["skipped"] * 3 + ["failed"] * 2
    assert tree_hashes(out) == hashes

    # a corrupted output, a missing done.json, and a truncated done.json are redone
    (out / "p0" / "warped.bin").write_bytes(b"corrupt")
    (out / "p1" / DONE_NAME).unlink()
    (out / "p2" / DONE_NAME).write_text('{"version": 1, "fil')
    recs = run_batch(str(csv_path), str(out), register_one=stub_register, progress=False, scale=2.0)
    assert [r["status"] for r in recs[:3]] == ["done"] * 3
    assert tree_hashes(out) == hashes

    # changed options or changed inputs invalidate the record
    recs = run_batch(str(csv_path), str(out), register_one=stub_register, progress=False, scale=3.0)
    assert [r["status"] for r in recs[:3]] == ["done"] * 3
    (tmp_path / "in" / "moving1.nii.gz").write_bytes(b"new moving image")
    recs = run_batch(str(csv_path), str(out), register_one=stub_register, progress=False, scale=3.0)
    assert [r["status"] for r in recs[:3]] == ["skipped", "done", "skipped"]


def test_verify_done_rejects_tampering(tmp_path: Path) -> None:
    csv_path = make_inputs(tmp_path / "in", n=1)
    out = tmp_path / "out"
    run_batch(str(csv_path), str(out), register_one=stub_register, progress=False)
    pair = read_pairs(csv_path)[0]
    assert verify_done(pair, str(out / "p0"), {}) is not None
    assert verify_done(pair, str(out / "p0"), {"scale": 5}) is None
    with open(out / "p0" / "warped.bin", "ab") as fh:
        fh.write(b"!")
    assert verify_done(pair, str(out / "p0"), {}) is None


def test_output_equal_to_input_refused(tmp_path: Path) -> None:
    csv_path = make_inputs(tmp_path / "in", n=1)
    with pytest.raises(AvsmError, match="output folder"):
        run_batch(str(csv_path), str(tmp_path / "in" / "fixed0.nii.gz"), register_one=stub_register,
                  progress=False)
    # inputs inside a pair's output folder: that pair fails, nothing is written there
    (tmp_path / "in" / "p0").mkdir()
    csv_path.write_text("moving,fixed,name\np0/m.nii.gz,fixed0.nii.gz,p0\nmoving0.nii.gz,fixed0.nii.gz,ok\n")
    (tmp_path / "in" / "p0" / "m.nii.gz").write_bytes(b"moving")
    recs = run_batch(str(csv_path), str(tmp_path / "in"), register_one=stub_register, progress=False)
    assert recs[0]["status"] == "failed" and "output folder" in recs[0]["error"]
    assert recs[1]["status"] == "done"
    assert sorted(os.listdir(tmp_path / "in" / "p0")) == ["m.nii.gz"]


def test_worker_pool_matches_serial(tmp_path: Path) -> None:
    csv_path = make_inputs(tmp_path / "in", n=4, bad=True)
    serial = run_batch(str(csv_path), str(tmp_path / "serial"), register_one=stub_register, progress=False)
    pooled = run_batch(str(csv_path), str(tmp_path / "pool"), register_one=stub_register, workers=2,
                       progress=False)
    assert [r["status"] for r in serial] == [r["status"] for r in pooled]
    assert [r["error"] for r in serial] == [r["error"] for r in pooled]
    assert tree_hashes(tmp_path / "serial") == tree_hashes(tmp_path / "pool")


def test_slurm_array_shards_then_status_merges(tmp_path: Path) -> None:
    """Two SLURM array tasks (ids 1 and 2 of --array=1-2): each takes its share, no barrier, no manifest;
    ``avsm status`` merges them into the same manifest as one serial run."""
    csv_path = make_inputs(tmp_path / "in", n=5)
    out = tmp_path / "out"
    code = ("import sys, json; from avsm.batch import run_batch; from test_batch import stub_register; "
            f"r = run_batch({str(csv_path)!r}, {str(out)!r}, register_one=stub_register, progress=False); "
            "print(json.dumps([x['name'] for x in r]))")
    procs = []
    for task in (2, 1):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1",
               "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_TASK_COUNT": "2",
               "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
        env.pop("WORLD_SIZE", None)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace"))
    outs = {}
    for task, p in zip((2, 1), procs):
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se
        outs[task] = json.loads(so.strip().splitlines()[-1])
    assert outs[1] == ["p0", "p2", "p4"] and outs[2] == ["p1", "p3"]
    assert not (out / MANIFEST_CSV).exists()  # shards do not merge; avsm status does
    from avsm.cli.main import main

    assert main(["status", str(out)]) == 0
    rows = list(csv.DictReader(open(out / MANIFEST_CSV)))
    assert [r["name"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert [r["status"] for r in rows] == ["done"] * 5
    serial = run_batch(str(csv_path), str(tmp_path / "serial"), register_one=stub_register, progress=False)
    assert [r["status"] for r in serial] == ["done"] * 5
    assert tree_hashes(out) == tree_hashes(tmp_path / "serial")


def label_register(fixed: str, moving: str, out_dir: str, *, moving_labels: str | None = None,
                   fixed_labels: str | None = None, label_mapping: str | None = None,
                   fixed_mask: str | None = None, moving_mask: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Stub that records what it was given (label mapping and masks) in its summary."""
    stub_register(fixed, moving, out_dir)
    return {"label_mapping": label_mapping, "fixed_mask": fixed_mask, "moving_mask": moving_mask}


def test_label_mapping_and_masks_in_batch_mode(tmp_path: Path) -> None:
    """--label-mapping (and --fixed-mask) fill empty cells, a row's own column wins; their contents
    are part of the fingerprint: editing the mapping file re-runs the pairs that use it."""
    d = tmp_path / "in"
    make_inputs(d, n=3)
    (d / "map_all.csv").write_text("3,5\n")
    (d / "map_p1.csv").write_text("fixed,moving\n7,8\n")
    (d / "mask.nii.gz").write_bytes(b"mask")
    (d / "pairs.csv").write_text("moving,fixed,name,label_mapping\nmoving0.nii.gz,fixed0.nii.gz,p0,\n"
                                 "moving1.nii.gz,fixed1.nii.gz,p1,map_p1.csv\nmoving2.nii.gz,fixed2.nii.gz,p2,\n")
    out = tmp_path / "out"
    recs = run_batch(str(d / "pairs.csv"), str(out), register_one=label_register, progress=False,
                     label_mapping=str(d / "map_all.csv"), fixed_mask=str(d / "mask.nii.gz"))
    got = {r["name"]: r["summary"] for r in recs}
    assert got["p0"]["label_mapping"] == str(d / "map_all.csv")
    assert got["p1"]["label_mapping"] == str(d / "map_p1.csv")
    assert all(g["fixed_mask"] == str(d / "mask.nii.gz") and g["moving_mask"] is None for g in got.values())
    (d / "map_all.csv").write_text("3,6\n")  # p0 and p2 use it
    recs = run_batch(str(d / "pairs.csv"), str(out), register_one=label_register, progress=False,
                     label_mapping=str(d / "map_all.csv"), fixed_mask=str(d / "mask.nii.gz"))
    assert [r["status"] for r in recs] == ["done", "skipped", "done"]


def test_cli_batch_with_real_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``avsm register --pairs`` through avsm.pipeline.register_pair (affine, 1 iteration per scale):
    a corrupt pair fails with its file named in the manifest, the good one completes, a rerun skips it."""
    import numpy as np
    import SimpleITK as sitk

    from avsm.cli.main import main

    d = tmp_path / "in"
    d.mkdir()
    z, y, x = np.mgrid[0:9, 0:10, 0:11].astype(np.float32)
    for i, shift in enumerate((0.0, 1.0)):
        a = 100 * np.exp(-(((z - 4) / 3) ** 2 + ((y - 5 - shift) / 3) ** 2 + ((x - 5) / 4) ** 2)) + 1
        img = sitk.GetImageFromArray(a.astype(np.float32))
        img.SetSpacing((2.0, 2.0, 2.5))
        sitk.WriteImage(img, str(d / f"img{i}.nii.gz"))
    (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + b"0" * 100)
    (d / "pairs.csv").write_text("moving,fixed,name\nimg1.nii.gz,img0.nii.gz,good\ncorrupt.nii.gz,img0.nii.gz,broken\n")
    out = tmp_path / "out"
    argv = ["register", "--pairs", str(d / "pairs.csv"), "--out-dir", str(out), "--method", "affine",
            "--affine-iterations", "1,1,1", "--quiet"]
    assert main(argv) == 1  # one pair failed
    rows = {r["name"]: r for r in csv.DictReader(open(out / MANIFEST_CSV))}
    assert rows["good"]["status"] == "done" and rows["broken"]["status"] == "failed"
    assert "corrupt.nii.gz" in rows["broken"]["error"]
    assert (out / "good" / DONE_NAME).exists() and (out / "good" / "warped.nii.gz").exists()
    assert (out / "good" / "transform_1Warp.nii.gz").exists()
    assert not (out / "broken").exists() or not any((out / "broken").iterdir())
    capsys.readouterr()
    assert main(argv) == 1
    rows = {r["name"]: r for r in csv.DictReader(open(out / MANIFEST_CSV))}
    assert rows["good"]["status"] == "skipped"


def nan_register(fixed: str, moving: str, out_dir: str, **kw: Any) -> dict[str, Any]:
    """Stub whose summary has a NaN metric and a non-JSON value."""
    stub_register(fixed, moving, out_dir)
    return {"mean_dice": float("nan"), "where": Path(out_dir)}


def test_manifest_is_strict_json(tmp_path: Path) -> None:
    csv_path = make_inputs(tmp_path / "in", n=1)
    out = tmp_path / "out"
    recs = run_batch(str(csv_path), str(out), register_one=nan_register, progress=False)
    assert recs[0]["status"] == "done" and recs[0]["summary"]["mean_dice"] is None
    for f in (out / MANIFEST_JSON, out / "p0" / DONE_NAME):
        json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"{f.name} has {c}"))
