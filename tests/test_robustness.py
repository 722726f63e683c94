"""Robustness under bad inputs and faults, through the command line in-process.

Bad inputs tried (each through ``avsm register``; all must exit != 0 with one
line naming the offending file and leave no output file):

corrupt NIfTI (random bytes, ``.nii.gz`` and ``.nii``), empty file, truncated ``.nii.gz``, truncated ``.nii``,
2-D image, 4-D image with 3 volumes, 3-component vector image, NaN voxels, Inf
voxels, float64 values overflowing float32, constant image, all-zero image,
label map with a different origin / shape than its image, label map with
non-integer values, 1-voxel-thick image, missing file, a directory as image, an
output that would overwrite an input, an output folder below a regular file, an
unwritable output folder (skipped as root).  Accepted: intensities of 1e30
(registers; the warped image keeps the scale).  A label map with 0 labels is
refused.

Faults: a batch killed with SIGKILL mid-pair leaves nothing a resume accepts as
done, and the resume completes with identical files.  Property test
(hypothesis): read -> identity warp -> write round trips keep geometry and values.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avsm.api import identity_result
from avsm.batch import DONE_NAME, read_pairs, run_batch, verify_done
from avsm.cli.main import main
from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image, save_image

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

OBLIQUE = (0.8660254, -0.5, 0.0, 0.4330127, 0.75, -0.5, 0.25, 0.4330127, 0.8660254)
FAST = ["--method", "affine", "--affine-iterations", "1,1,1", "--quiet"]


def blob(size=(12, 11, 9), spacing=(2.0, 2.2, 2.5), origin=(-12.0, -10.0, -9.0), shift=0.0,
         direction=OBLIQUE) -> sitk.Image:
    """A small smooth float32 image (ITK ``size`` x, y, z)."""
    z, y, x = np.mgrid[0 : size[2], 0 : size[1], 0 : size[0]].astype(np.float32)
    c = np.array(size[::-1], dtype=np.float32) / 2
    a = 100 * np.exp(-(((z - c[0]) / 3) ** 2 + ((y - c[1] - shift) / 4) ** 2 + ((x - c[2]) / 4) ** 2))
    a += np.random.default_rng(0).random(a.shape).astype(np.float32)
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("good")
    fixed, moving = str(d / "fixed.nii.gz"), str(d / "moving.nii.gz")
    sitk.WriteImage(blob(), fixed)
    sitk.WriteImage(blob(shift=1.0, origin=(-11.0, -10.5, -9.0)), moving)
    labels = str(d / "moving_labels.nii.gz")
    lab = sitk.Cast(sitk.ReadImage(moving) > 50, sitk.sitkUInt8)
    sitk.WriteImage(lab, labels)
    return {"fixed": fixed, "moving": moving, "moving_labels": labels, "dir": str(d)}


def files_below(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --------------------------------------------------------------------------- bad inputs


def _write(img: sitk.Image, path: Path) -> str:
    sitk.WriteImage(img, str(path))
    return str(path)


def _truncated(good: dict[str, str], path: Path, frac: float) -> str:
    if str(path).endswith(".nii"):
        sitk.WriteImage(sitk.ReadImage(good["moving"]), str(path))
    else:
        shutil.copy(good["moving"], path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])
    return str(path)


def _with_array(good: dict[str, str], arr_fn: Callable[[np.ndarray], np.ndarray], path: Path) -> str:
    ref = sitk.ReadImage(good["moving"])
    img = sitk.GetImageFromArray(arr_fn(sitk.GetArrayFromImage(ref)))
    img.CopyInformation(ref)
    return _write(img, path)


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[2, 3, 4] = np.nan
    return a


def _inf(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[1, 1, 1] = np.inf
    return a


def _four_d(good: dict[str, str], path: Path) -> str:
    vol = sitk.ReadImage(good["moving"])
    img = sitk.JoinSeries([vol, vol, vol])
    assert img.GetDimension() == 4 and img.GetNumberOfComponentsPerPixel() == 1
    return _write(img, path)


def _vector(good: dict[str, str], path: Path) -> str:
    a = sitk.GetArrayFromImage(sitk.ReadImage(good["moving"]))
    return _write(sitk.GetImageFromArray(np.stack([a, a, a], -1), isVector=True), path)


def _labels_like(good: dict[str, str], path: Path, **geometry: object) -> str:
    lab = sitk.ReadImage(good["moving_labels"])
    if "size" in geometry:
        lab = sitk.Image(list(geometry["size"]), sitk.sitkUInt8)  # type: ignore[arg-type]
        lab[2, 2, 2] = 1
        lab.SetSpacing((2.0, 2.2, 2.5))
        lab.SetDirection(OBLIQUE)
    if "origin" in geometry:
        lab.SetOrigin(geometry["origin"])  # type: ignore[arg-type]
    else:
        lab.SetOrigin((-11.0, -10.5, -9.0))
    return _write(lab, path)


#: id -> builder(good, tmp) returning (extra CLI args, name of the file the message must name)
BAD_INPUTS: dict[str, Callable[[dict[str, str], Path], tuple[list[str], str]]] = {
    "corrupt_nifti": lambda g, t: (["--moving", str(_bytes(t / "corrupt.nii.gz", _noise(5, 3000)))],
                                   "corrupt.nii.gz"),
    "garbage_nii": lambda g, t: (["--moving", str(_bytes(t / "garbage.nii", _noise(6, 500)))], "garbage.nii"),
    "empty_file": lambda g, t: (["--moving", str(_bytes(t / "empty.nii.gz", b""))], "empty.nii.gz"),
    "truncated_nii_gz": lambda g, t: (["--moving", _truncated(g, t / "trunc.nii.gz", 0.6)], "trunc.nii.gz"),
    "truncated_nii": lambda g, t: (["--moving", _truncated(g, t / "trunc.nii", 0.7)], "trunc.nii"),
    "2d_image": lambda g, t: (["--moving", _write(sitk.Image([9, 8], sitk.sitkFloat32) + 1.0,
                                                  t / "flat2d.nii.gz")], "flat2d.nii.gz"),
    "4d_image_3_volumes": lambda g, t: (["--moving", _four_d(g, t / "four.nii.gz")], "four.nii.gz"),
    "vector_image": lambda g, t: (["--moving", _vector(g, t / "vec.nii.gz")], "vec.nii.gz"),
    "nan_voxels": lambda g, t: (["--moving", _with_array(g, _nan, t / "nan.nii.gz")], "nan.nii.gz"),
    "inf_voxels": lambda g, t: (["--fixed", _with_array(g, _inf, t / "inf.nii.gz")], "inf.nii.gz"),
    "float64_overflow": lambda g, t: (["--moving", _with_array(g, lambda a: a.astype(np.float64) * 1e300,
                                                                t / "over.nii.gz")], "over.nii.gz"),
    "constant_image": lambda g, t: (["--moving", _with_array(g, lambda a: np.full_like(a, 7.0),
                                                              t / "const.nii.gz")], "const.nii.gz"),
    "all_zero_image": lambda g, t: (["--fixed", _with_array(g, np.zeros_like, t / "zero.nii.gz")],
                                    "zero.nii.gz"),
    "label_origin_mismatch": lambda g, t: (
        ["--moving-labels", _labels_like(g, t / "lab_origin.nii.gz", origin=(0.0, 0.0, 0.0))],
        "lab_origin.nii.gz"),
    "label_shape_mismatch": lambda g, t: (
        ["--moving-labels", _labels_like(g, t / "lab_shape.nii.gz", size=(12, 11, 8))], "lab_shape.nii.gz"),
    "label_non_integer": lambda g, t: (
        ["--moving-labels", _with_array(g, lambda a: (a > 50).astype(np.float32) * 1.5, t / "lab_f.nii.gz")],
        "lab_f.nii.gz"),
    "one_voxel_thick": lambda g, t: (["--moving", _write(blob(size=(12, 11, 1)), t / "thin.nii.gz")],
                                     "thin.nii.gz"),
    "missing_file": lambda g, t: (["--moving", str(t / "nothere.nii.gz")], "nothere.nii.gz"),
    "directory_as_image": lambda g, t: (["--fixed", str(_mkdir(t / "adir.nii.gz"))], "adir.nii.gz"),
}


def _noise(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _register(good: dict[str, str], out: Path, extra: list[str]) -> list[str]:
    args = {"--fixed": good["fixed"], "--moving": good["moving"]}
    rest: list[str] = []
    i = 0
    while i < len(extra):
        if extra[i] in args:
            args[extra[i]] = extra[i + 1]
        else:
            rest += extra[i : i + 2]
        i += 2
    return ["register", *[x for kv in args.items() for x in kv], *rest, "--out-dir", str(out), *FAST]


def _assert_refused(rc: int, err: str, name: str, out: Path) -> None:
    line = err.strip()
    assert rc != 0
    assert line.count("\n") == 0 and line.startswith("avsm: error:"), line
    assert name in line, line
    assert files_below(out) == [], files_below(out)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_refused(case: str, good: dict[str, str], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    extra, name = BAD_INPUTS[case](good, tmp_path)
    out = tmp_path / "out"
    rc = main(_register(good, out, extra))
    _assert_refused(rc, capsys.readouterr().err, name, out)


def test_output_would_overwrite_input(good: dict[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    moving = out / "warped.nii.gz"  # the name register writes
    shutil.copy(good["moving"], moving)
    before = moving.read_bytes()
    rc = main(_register(good, out, ["--moving", str(moving)]))
    err = capsys.readouterr().err
    assert rc != 0 and "warped.nii.gz" in err and "overwrite" in err and err.strip().count("\n") == 0
    assert moving.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["warped.nii.gz"]


def test_output_dir_below_a_file(good: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub"
    rc = main(_register(good, out, []))
    _assert_refused(rc, capsys.readouterr().err, "afile", tmp_path / "nothing")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(good: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        rc = main(_register(good, out, []))
        _assert_refused(rc, capsys.readouterr().err, "ro", out)
    finally:
        out.chmod(0o700)


def test_label_map_with_no_labels(good: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = _with_array(good, lambda a: np.zeros(a.shape, np.uint8), tmp_path / "nolabels.nii.gz")
    out = tmp_path / "out"
    rc = main(_register(good, out, ["--moving-labels", empty]))
    _assert_refused(rc, capsys.readouterr().err, "nolabels.nii.gz", out)


def test_huge_intensities_register(good: dict[str, str], tmp_path: Path) -> None:
    """1e30-scaled intensities (finite in float32) register; the warped image keeps the scale."""
    huge = _with_array(good, lambda a: a * np.float32(1e28), tmp_path / "huge.nii.gz")
    out = tmp_path / "out"
    assert main(_register(good, out, ["--moving", huge])) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.isfinite(warped).all() and 1e29 < warped.max() < 1.1e30


# --------------------------------------------------------------------------- SIGKILL mid-batch


def _tree(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name not in (DONE_NAME, "manifest.csv", "manifest.json")}


def test_sigkill_mid_batch_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(TESTS))
    from test_batch import make_inputs, slow_partial_register

    csv_path = make_inputs(tmp_path / "in", n=3)
    out = tmp_path / "out"
    code = ("from avsm.batch import run_batch; from test_batch import slow_partial_register; "
            f"run_batch({str(csv_path)!r}, {str(out)!r}, register_one=slow_partial_register, progress=False)")
    env = {**os.environ, "AVSM_STUB_SLEEP": "3", "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # first pair complete, second pair half written (a.bin, no b.bin yet)
        while not ((out / "p0" / DONE_NAME).exists() and (out / "p1" / "a.bin").exists()):
            assert proc.poll() is None, "batch ended before it could be killed"
            assert time.monotonic() < deadline, "batch did not progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "p1" / "a.bin").exists() and not (out / "p1" / "b.bin").exists()
    pairs = read_pairs(csv_path)
    assert verify_done(pairs[0], str(out / "p0"), {}) is not None
    assert verify_done(pairs[1], str(out / "p1"), {}) is None  # half-written pair not accepted
    assert verify_done(pairs[2], str(out / "p2"), {}) is None
    assert not (out / "manifest.csv").exists()

    monkeypatch.setenv("AVSM_STUB_SLEEP", "0")
    recs = run_batch(str(csv_path), str(out), register_one=slow_partial_register, progress=False)
    assert [r["status"] for r in recs] == ["skipped", "done", "done"]
    clean = tmp_path / "clean"
    run_batch(str(csv_path), str(clean), register_one=slow_partial_register, progress=False)
    assert _tree(out) == _tree(clean)
    assert all(verify_done(p, str(out / p.name), {}) is not None for p in pairs)
    assert not [p for p in out.rglob(".avsm-tmp-*")]


# --------------------------------------------------------------------------- property test


def _rotation(angles: tuple[float, float, float], flip: bool) -> np.ndarray:
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    R = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    return R @ np.diag([1.0, 1.0, -1.0]) if flip else R


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(*[st.integers(2, 6)] * 3),
    spacing=st.tuples(*[st.floats(0.3, 3.0)] * 3),
    origin=st.tuples(*[st.floats(-100.0, 100.0)] * 3),
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    flip=st.booleans(),
    ext=st.sampled_from([".nii.gz", ".nrrd", ".mha"]),
    seed=st.integers(0, 2**16),
)
def test_identity_warp_round_trip(tmp_path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                                  origin: tuple[float, float, float], angles: tuple[float, float, float],
                                  flip: bool, ext: str, seed: int) -> None:
    grid = Grid(shape=shape, spacing=spacing, origin=origin,
                direction=tuple(_rotation(angles, flip).reshape(-1)))
    arr = np.random.default_rng(seed).random(shape).astype(np.float32) * 50 + 1
    src = tmp_path / f"src_{seed}{ext}"
    save_image(Volume(arr, grid), src)
    vol = load_image(src)
    assert vol.grid.is_close(grid, 1e-4)
    warped = identity_result(vol, vol).warp(vol)
    assert warped.grid == vol.grid
    np.testing.assert_allclose(warped.array, vol.array, rtol=0, atol=1e-3)
    dst = tmp_path / f"dst_{seed}{ext}"
    save_image(warped, dst)
    back = load_image(dst)
    assert back.grid.is_close(grid, 1e-4)
    np.testing.assert_allclose(back.array, arr, rtol=0, atol=1e-3)
