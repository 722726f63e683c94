"""ITK HDF5 composite export (``--format h5``): layout as ITK writes it, and three independent
readers (SimpleITK/ITK, antspyx/ANTs, nitransforms) reproducing avsm's own warp.

The result is a real avsm vSVF result (an oblique anisotropic affine plus two smooth velocity
steps replayed by avsm's integrators, :func:`test_export.steps_result`) between images of
different oblique, anisotropic geometry, so no optimisation runs.

Bounds asserted (measured values are logged with ``-o log_cli=true``):

* warped image through the exported ``.h5`` vs ``result.warp`` (forward) or
  ``result.warp(fixed, inverse=True)`` (inverse): max abs difference < 1e-3 of the source
  intensity range, on the voxels whose sampling point lies inside the source image;
* mapped points at the reference voxel centres vs ``result.world_map``: < 1e-3 mm.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from avsm.errors import AvsmError
from avsm.export.h5 import AFFINE_TYPE, COMPOSITE_TYPE, FIELD_TYPE, inverse_field_grid, write_h5_composites
from avsm.export.itk import (
    FORMATS,
    ROLES,
    affine_to_sitk,
    export_fields,
    grid_world_points,
    load_transform,
    transform_paths_for_prefix,
    world_affine,
    write_transforms,
)
from avsm.io.geometry import Grid
from avsm.io.image import Volume
from avsm.io.outputs import OutputTransaction
from test_export import (  # shared fixture geometry and helpers
    CENTRE,
    apply_h,
    make_grid,
    overlap,
    pattern,
    rel_err,
    rotation,
    sitk_warp,
    steps_result,
)

log = logging.getLogger(__name__)

pytestmark = pytest.mark.filterwarnings("ignore:Reference space not set:UserWarning")  # nitransforms, benign

BOUND = 1e-3


@pytest.fixture(scope="module")
def h5case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("h5")
    fgrid = make_grid((14, 12, 9), (1.3, 0.9, 2.1), rotation(0.3, -0.2, 0.5))
    mgrid = make_grid((17, 15, 11), (1.1, 1.2, 1.9), rotation(-0.25, 0.35, -0.4), shift=(0.8, -0.6, 0.5))
    fixed = Volume(pattern(grid_world_points(fgrid) * 1.1), fgrid, str(d / "fixed.nii.gz"))
    moving = Volume(pattern(grid_world_points(mgrid)), mgrid, str(d / "moving.nii.gz"))
    sitk.WriteImage(fixed.to_sitk(), fixed.path)
    sitk.WriteImage(moving.to_sitk(), moving.path)
    P = np.eye(4)
    P[:3, :3] = rotation(0.06, -0.04, 0.08) @ np.diag([1.06, 0.95, 1.03])  # scales: a sheared inverse grid
    P[:3, 3] = [0.7, -0.5, 0.4]
    P[:3, 3] += CENTRE - P[:3, :3] @ CENTRE
    result = steps_result(fixed, moving, P, seed=3)
    prefix = str(d / "out" / "pair_")
    with OutputTransaction(inputs=[fixed.path, moving.path]) as tx:
        files = write_transforms(result, prefix, tx, formats=("h5",))
    fwd_ref = result.warp(moving).array
    inv_ref = result.warp(fixed, inverse=True).array
    return {"dir": d, "fixed": fixed, "moving": moving, "result": result, "prefix": prefix, "files": files,
            "fwd_ref": fwd_ref, "fwd_mask": overlap(result, fgrid, mgrid),
            "inv_ref": inv_ref, "inv_mask": overlap(result, mgrid, fgrid, inverse=True)}


def _datasets(path: str) -> dict[str, tuple[str, tuple[int, ...], object]]:
    """``{name: (dtype kind or 'str', shape, value)}`` of every dataset of an HDF5 file."""
    out: dict[str, tuple[str, tuple[int, ...], object]] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            info = h5py.check_string_dtype(obj.dtype)
            kind = f"str-{info.encoding}-{info.length}" if info is not None else obj.dtype.str
            out[name] = (kind, obj.shape, obj[()])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def _swap_order(src: str, dst: str) -> str:
    """Copy of a 2-transform composite with the queue order reversed (a wrong file)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        g = f["TransformGroup"]
        g.move("1", "tmp")
        g.move("2", "1")
        g.move("tmp", "2")
    return dst


# --------------------------------------------------------------------------- layout


def test_files_and_formats(h5case: dict) -> None:
    files, prefix = h5case["files"], h5case["prefix"]
    assert "h5" in FORMATS
    assert files == {"composite_h5": prefix + "Composite.h5", "inverse_composite_h5": prefix + "InverseComposite.h5"}
    assert all(os.path.isfile(p) for p in files.values())
    assert not any(n.startswith(".avsm-tmp") for n in os.listdir(os.path.dirname(prefix)))


@pytest.mark.parametrize("role", ["composite_h5", "inverse_composite_h5"])
def test_layout_is_what_itk_writes(h5case: dict, role: str, tmp_path: Path) -> None:
    """Same datasets, types, shapes and values as ``sitk.WriteTransform`` of the same composite."""
    result, fixed, moving = h5case["result"], h5case["fixed"], h5case["moving"]
    M = world_affine(result)
    centre = fixed.grid.unit_to_world() @ np.array([0.5, 0.5, 0.5, 1.0])
    comp = sitk.CompositeTransform(3)
    if role == "composite_h5":
        grid, disp = fixed.grid, export_fields(result)["warp"]
        comp.AddTransform(affine_to_sitk(M, centre[:3]))  # ITK queue: the affine first (applied last)
    else:
        grid = inverse_field_grid(result, M)
        back = result.world_map(moving.grid, inverse=True)[0].numpy()
        disp = back - apply_h(np.linalg.inv(M), grid_world_points(moving.grid))
    img = grid.apply_to(sitk.GetImageFromArray(np.moveaxis(disp, 0, -1).astype(np.float64), isVector=True))
    comp.AddTransform(sitk.DisplacementFieldTransform(img))
    if role == "inverse_composite_h5":
        comp.AddTransform(affine_to_sitk(np.linalg.inv(M), centre[:3]))
    ref_path = str(tmp_path / "itk.h5")
    sitk.WriteTransform(comp, ref_path)
    ours, itk = _datasets(h5case["files"][role]), _datasets(ref_path)
    assert set(ours) == set(itk)
    for name, (kind, shape, value) in itk.items():
        assert ours[name][:2] == (kind, shape), name
        if kind.startswith("str"):
            if not name.startswith(("OS", "HDF", "ITK")):  # versions may differ from this ITK build
                assert ours[name][2].tolist() == value.tolist(), name
        else:
            atol = 1e-4 if name.endswith("/TransformParameters") and shape[0] > 12 else 1e-9  # float32 map
            assert np.allclose(ours[name][2], value, rtol=0, atol=atol), name
    types = [ours[f"TransformGroup/{i}/TransformType"][2][0] for i in range(3)]
    expected = [AFFINE_TYPE, FIELD_TYPE] if role == "composite_h5" else [FIELD_TYPE, AFFINE_TYPE]
    assert types == [t.encode() for t in [COMPOSITE_TYPE, *expected]]
    fp = ours[f"TransformGroup/{2 if role == 'composite_h5' else 1}/TransformFixedParameters"][2]
    assert fp[:3].tolist() == list(grid.itk_size)
    if role == "composite_h5":
        assert Grid(shape=grid.shape, spacing=fp[6:9], origin=fp[3:6], direction=fp[9:]).is_close(fixed.grid, 1e-9)


def test_inverse_field_nodes_are_the_moving_voxels_carried_back(h5case: dict) -> None:
    result, moving = h5case["result"], h5case["moving"]
    M = world_affine(result)
    g = inverse_field_grid(result, M)
    assert g.shape == moving.grid.shape
    assert np.allclose(apply_h(M, grid_world_points(g)), grid_world_points(moving.grid), atol=1e-9)
    D = g.direction_matrix
    assert np.abs(D.T @ D - np.eye(3)).max() > 1e-3  # the fixture's affine scales: not orthonormal


# --------------------------------------------------------------------------- three readers


def _ants_images(h5case: dict):  # noqa: ANN202  (ANTsImage pair)
    ants = pytest.importorskip("ants")
    return ants, ants.image_read(h5case["fixed"].path), ants.image_read(h5case["moving"].path)


def _nitransforms_warp(path: str, src: str, reference: str) -> np.ndarray:
    """``path`` read by nitransforms' ITK reader and applied to ``src`` on ``reference``; ``(D, H, W)``."""
    nitm = pytest.importorskip("nitransforms.manip")
    from nitransforms.resampling import apply

    chain = nitm.load(path, fmt="itk")
    out = apply(chain, src, reference=reference, order=1, mode="constant", cval=0.0, max_concurrent=1)
    return np.asanyarray(out.dataobj).transpose(2, 1, 0)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_sitk_ants_nitransforms_reproduce_avsm_warp(h5case: dict, direction: str) -> None:
    files, fixed, moving = h5case["files"], h5case["fixed"], h5case["moving"]
    if direction == "forward":
        path, src, ref = files["composite_h5"], moving, fixed
        expected, mask = h5case["fwd_ref"], h5case["fwd_mask"]
    else:
        path, src, ref = files["inverse_composite_h5"], fixed, moving
        expected, mask = h5case["inv_ref"], h5case["inv_mask"]
    errs = {"sitk": rel_err(sitk_warp(src, ref.grid, sitk.ReadTransform(path)), expected, mask, src.array)}
    try:
        ants, fi, mi = _ants_images(h5case)
    except pytest.skip.Exception as e:
        log.warning("antspyx not importable: %s", e)
    else:
        ref_img, src_img = (fi, mi) if direction == "forward" else (mi, fi)
        out = ants.apply_transforms(ref_img, src_img, transformlist=[path], interpolator="linear")
        errs["ants"] = rel_err(out.numpy().transpose(2, 1, 0), expected, mask, src.array)
    try:
        errs["nitransforms"] = rel_err(_nitransforms_warp(path, src.path, ref.path), expected, mask, src.array)
    except pytest.skip.Exception as e:
        log.warning("nitransforms not importable: %s", e)
    log.info("%s .h5 vs avsm warp, rel err: %s", direction, {k: f"{v:.2e}" for k, v in errs.items()})
    assert all(v < BOUND for v in errs.values()), errs
    if set(errs) != {"sitk", "ants", "nitransforms"}:
        pytest.skip(f"only {sorted(errs)} available")


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_points_match_world_map(h5case: dict, direction: str) -> None:
    """ITK and nitransforms map the reference voxel centres to avsm's world map (< 1e-3 mm)."""
    inverse = direction == "inverse"
    result = h5case["result"]
    grid = (h5case["moving"] if inverse else h5case["fixed"]).grid
    path = h5case["files"]["inverse_composite_h5" if inverse else "composite_h5"]
    pts = grid_world_points(grid).reshape(3, -1)
    wm = result.world_map(grid, inverse=inverse)[0].numpy().reshape(3, -1)
    tr = sitk.ReadTransform(path)
    got = np.array([tr.TransformPoint(tuple(p)) for p in pts.T]).T
    err = {"sitk": float(np.linalg.norm(got - wm, axis=0).max())}
    assert err["sitk"] < BOUND, err  # checked before nitransforms may skip the rest
    nitm = pytest.importorskip("nitransforms.manip")
    ras = np.diag([-1.0, -1.0, 1.0])  # nitransforms works in RAS
    got_nt = ras @ np.asarray(nitm.load(path, fmt="itk").map((ras @ pts).T)).T
    err["nitransforms"] = float(np.linalg.norm(got_nt - wm, axis=0).max())
    log.info("%s .h5 points vs world_map: max %s mm", direction, {k: f"{v:.1e}" for k, v in err.items()})
    assert all(v < BOUND for v in err.values()), err


def test_swapped_order_fails(h5case: dict, tmp_path: Path) -> None:
    """The checks above can fail: the same transforms in the other queue order are far off."""
    files, fixed, moving = h5case["files"], h5case["fixed"], h5case["moving"]
    fwd = _swap_order(files["composite_h5"], str(tmp_path / "fwd.h5"))
    inv = _swap_order(files["inverse_composite_h5"], str(tmp_path / "inv.h5"))
    e_f = rel_err(sitk_warp(moving, fixed.grid, sitk.ReadTransform(fwd)), h5case["fwd_ref"], h5case["fwd_mask"],
                  moving.array)
    e_i = rel_err(sitk_warp(fixed, moving.grid, sitk.ReadTransform(inv)), h5case["inv_ref"], h5case["inv_mask"],
                  fixed.array)
    log.info("swapped order: rel err forward %.2e, inverse %.2e", e_f, e_i)
    assert e_f > 10 * BOUND and e_i > 10 * BOUND
    pytest.importorskip("nitransforms")
    e_nt = rel_err(_nitransforms_warp(fwd, moving.path, fixed.path), h5case["fwd_ref"], h5case["fwd_mask"],
                   moving.array)
    assert e_nt > 10 * BOUND


def test_inverse_between_nodes_equals_the_inverse_composite_nifti(h5case: dict, tmp_path: Path) -> None:
    """Off the nodes the .h5 inverse equals ``InverseComposite.nii.gz`` (same moving-grid samples).

    Trilinear weights are invariant under the affine that carries the moving grid to the .h5
    inverse grid, and reproduce affine functions, so ``Minv(y) + e(Minv y)`` interpolates
    ``total^-1`` at the moving voxel centres exactly as the NIfTI inverse composite does.
    """
    result, fixed, moving = h5case["result"], h5case["fixed"], h5case["moving"]
    with OutputTransaction() as tx:
        nii = write_transforms(result, str(tmp_path / "n_"), tx, formats=("composite",))["inverse_composite"]
    ref = load_transform([nii])
    h5 = sitk.ReadTransform(h5case["files"]["inverse_composite_h5"])
    # points between the moving voxel centres: the fixed voxel centres mapped forward, kept inside
    y = result.world_map(fixed.grid)[0].numpy().reshape(3, -1)
    idx = apply_h(np.linalg.inv(moving.grid.index_to_world()), y)
    inside = np.all([(idx[c] >= 0.01) & (idx[c] <= n - 1.01) for c, n in enumerate(moving.grid.itk_size)], axis=0)
    assert inside.sum() > 100 and np.abs(idx - np.round(idx))[:, inside].max() > 0.3
    err = max(np.linalg.norm(np.array(h5.TransformPoint(tuple(q))) - np.array(ref.TransformPoint(tuple(q))))
              for q in y[:, inside].T)
    log.info("inverse .h5 vs InverseComposite.nii.gz between nodes: max %.2e mm", err)
    assert err < 1e-4


# --------------------------------------------------------------------------- writer details


def test_given_warp_is_used_and_consumed(h5case: dict, tmp_path: Path) -> None:
    result = h5case["result"]
    warp = export_fields(result)["warp"].astype(np.float32)
    for formats in (("ants", "h5"), ("h5",)):
        fields = {"warp": warp + 1.0}  # a recognisable field: it must be the one written
        with OutputTransaction() as tx:
            files = write_transforms(result, str(tmp_path / f"{len(formats)}_"), tx, formats=formats, fields=fields)
        assert fields == {}  # popped: no full-resolution field stays referenced
        with h5py.File(files["composite_h5"], "r") as f:
            params = f["TransformGroup/2/TransformParameters"][()]
        assert np.allclose(params, (np.moveaxis(warp, 0, -1) + 1.0).reshape(-1), atol=1e-6)


def test_slabs_and_precision(h5case: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slab-wise writing equals the one-slab file (< 1e-5 mm); float64 evaluation differs by < 1e-4 mm."""
    import avsm.transform as T

    result, fixed = h5case["result"], h5case["fixed"]

    def params(prefix: str, dtype: str = "float32") -> dict[str, np.ndarray]:
        with OutputTransaction() as tx:
            files = write_h5_composites(result, prefix, tx, dtype=dtype)
        out = {}
        for role, p in files.items():
            with h5py.File(p, "r") as f:
                out[role] = f[f"TransformGroup/{2 if role == 'composite_h5' else 1}/TransformParameters"][()]
        return out

    plane = fixed.grid.shape[1] * fixed.grid.shape[2]
    monkeypatch.setattr(T, "SLAB_VOXELS", 10 ** 9)
    whole = params(str(tmp_path / "whole_"))
    monkeypatch.setattr(T, "SLAB_VOXELS", 2 * plane)  # slabs of 2 slices
    assert len(T.slab_ranges(fixed.grid)) > 2
    slabs = params(str(tmp_path / "slabs_"))
    double = params(str(tmp_path / "double_"), "float64")
    for role in whole:
        assert np.allclose(whole[role], slabs[role], rtol=0, atol=1e-5), role  # float32 map per slab
        assert np.abs(whole[role] - double[role]).max() < 1e-4, role


def test_write_errors(h5case: dict, tmp_path: Path) -> None:
    from avsm.export.h5 import write_itk_composite_h5

    with pytest.raises(AvsmError, match="cannot write HDF5 transform"):
        write_itk_composite_h5(str(tmp_path / "missing" / "x.h5"), [], final="out/x.h5")
    with pytest.raises(RuntimeError, match="late failure"):  # a later failure leaves nothing behind
        with OutputTransaction() as tx:
            write_transforms(h5case["result"], str(tmp_path / "r" / "x_"), tx, formats=("h5",))
            raise RuntimeError("late failure")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    with pytest.raises(AvsmError, match="unknown transform format"):
        with OutputTransaction() as tx:
            write_transforms(h5case["result"], str(tmp_path / "y_"), tx, formats=("hdf5",))


# --------------------------------------------------------------------------- CLI and pipeline


def test_cli_warp_reads_the_h5(h5case: dict, tmp_path: Path) -> None:
    from avsm.cli.main import main

    files, fixed, moving, prefix = h5case["files"], h5case["fixed"], h5case["moving"], h5case["prefix"]
    assert transform_paths_for_prefix(prefix) == [(files["composite_h5"], False)]
    assert transform_paths_for_prefix(prefix, inverse=True) == [(files["inverse_composite_h5"], False)]
    runs = {"file": (moving, fixed, ["-t", files["composite_h5"]], "fwd"),
            "prefix": (moving, fixed, ["-t", prefix], "fwd"),
            "inverse file": (fixed, moving, ["-t", files["inverse_composite_h5"]], "inv"),
            "inverse prefix": (fixed, moving, ["-t", prefix, "--inverse"], "inv")}
    for name, (src, ref, targs, which) in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        assert main(["warp", "-m", src.path, "-r", ref.path, *targs, "-o", str(out)]) == 0
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        e = rel_err(got, h5case[f"{which}_ref"], h5case[f"{which}_mask"], src.array)
        log.info("avsm warp %s: rel err %.2e", name, e)
        assert e < BOUND, name
    # the composite is non-linear: it cannot be inverted as a whole
    with pytest.raises(AvsmError):
        load_transform([f"[{files['composite_h5']},1]"])


def test_cli_and_pipeline_accept_h5() -> None:
    from avsm.cli.register import _formats
    from avsm.pipeline import OutputSettings

    assert _formats(["ants,h5"]) == ("ants", "h5")
    assert OutputSettings(formats=("h5",)).formats == ("h5",)
    assert ROLES["composite_h5"] == "Composite.h5" and ROLES["inverse_composite_h5"] == "InverseComposite.h5"


def test_register_pair_writes_h5(h5case: dict, tmp_path: Path) -> None:
    """``avsm.pipeline`` with ``formats=("ants", "h5")``: the .h5 reproduces the run's warped.nii.gz."""
    from avsm.optim.affine_opt import AffineOptConfig
    from avsm.pipeline import OutputSettings, register_pair
    from avsm.settings import preset

    fixed, moving = h5case["fixed"], h5case["moving"]
    s = preset("fast", method="affine", affine=AffineOptConfig(scales=(0.5, 1.0), iterations=(2, 2)))
    summary = register_pair(fixed.path, moving.path, str(tmp_path / "out"), settings=s,
                            outputs=OutputSettings(formats=("ants", "h5")), progress=False)
    outs = summary["outputs"]
    assert {"affine", "warp", "inverse_warp", "composite_h5", "inverse_composite_h5"} <= set(outs)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(outs["warped"]))
    tr = sitk.ReadTransform(outs["composite_h5"])
    got = sitk_warp(moving, fixed.grid, tr)
    # compare where the sampling point is inside the moving image (its border is sampled differently)
    pts = np.array([tr.TransformPoint(tuple(p)) for p in grid_world_points(fixed.grid).reshape(3, -1).T]).T
    idx = apply_h(np.linalg.inv(moving.grid.index_to_world()), pts).reshape(3, *fixed.grid.shape)
    mask = np.all([(idx[c] >= 1e-4) & (idx[c] <= n - 1 - 1e-4) for c, n in enumerate(moving.grid.itk_size)], axis=0)
    e = rel_err(got, warped, mask, moving.array)
    log.info("register_pair: .h5 vs warped.nii.gz rel err %.2e", e)
    assert e < BOUND
