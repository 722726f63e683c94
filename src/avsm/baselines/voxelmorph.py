"""VoxelMorph as a learned peer: training on avsm's data and augmentation, and a baseline wrapper.

The network is the ``voxelmorph`` package's own (``pip install voxelmorph``,
0.3.4, pure PyTorch): ``VxmPairwise`` (a U-Net predicting a stationary
velocity field, integrated by scaling and squaring), with four levels
``nb_features=(16, 32, 32, 32)`` because the default five levels need sizes
divisible by 32 (peer-tools notes).  Loss: the usual diffeomorphic VoxelMorph
loss, ``−NCC₉(warped, fixed) + λ‖∇v‖²`` (``neurite``'s NCC returns the squared
local correlation; λ = 1).

Same data, same budget as AVSM (:func:`train_voxelmorph`): the prepared
folder of ``scripts/prepare_training_data.py`` (the same two brains on the
same 4.2 mm working grid), :class:`avsm.train.data.PairDataset` with the same
augmentation ranges, one CPU thread, a wall-time budget, checkpoint selection
on the same synthetic validation pairs (mean Dice).

VoxelMorph has no affine part, so the wrapper (:func:`voxelmorph`) first runs
the SimpleITK Mattes-MI affine (:func:`avsm.baselines.demons.affine_transform`,
the one the demons baseline uses, on the same ≈2 mm working pair), resamples the moving
working image onto the fixed working grid through it, and runs the network
there.  The result is ``x ↦ A (x + u(x))``: ``u`` the network's displacement
converted from voxels (tensor axis order) to world LPS mm on the fixed working
grid, ``A`` the affine.  No inverse is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avsm.baselines.base import FieldResult, MethodUnavailable, WorldTransform, working_inputs
from avsm.io.geometry import Grid
from avsm.io.image import Volume

__all__ = ["build_network", "train_voxelmorph", "voxelmorph", "displacement_to_world", "DEFAULT_WEIGHTS"]

log = logging.getLogger(__name__)

#: Where ``scripts/train_voxelmorph.sh`` puts the trained weights (repository checkout only).
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "voxelmorph" / "vxm_brain.pt"
NB_FEATURES = (16, 32, 32, 32)


def _vxm() -> Any:
    try:
        import voxelmorph as vxm  # type: ignore[import-not-found]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MethodUnavailable(f"voxelmorph: package not installed ({e}); pip install voxelmorph") from e
    return vxm


def warmup() -> None:
    """Import voxelmorph/neurite now (about 3 s), so that method timings exclude the import."""
    _vxm()
    _losses()


def build_network(nb_features: tuple[int, ...] = NB_FEATURES, integration_steps: int = 5) -> torch.nn.Module:
    """A ``voxelmorph.nn.models.VxmPairwise`` for single-channel 3-D pairs."""
    vxm = _vxm()
    return vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                     nb_features=list(nb_features), integration_steps=integration_steps)


def _losses() -> tuple[torch.nn.Module, torch.nn.Module]:
    import neurite as ne  # type: ignore[import-not-found]

    return ne.nn.modules.NCC(window_size=9), ne.nn.modules.SpatialGradient("l2")




def train_voxelmorph(data: str, out: str, *, minutes: float = 55.0, seed: int = 1, lr: float = 1e-4,
                     lam: float = 1.0, iters_per_epoch: int = 25, augmentation: dict[str, Any] | None = None,
                     val_per_volume: int = 2, threads: int = 1, working_spacing: float = 4.2) -> dict[str, Any]:
    """Train VoxelMorph on a prepared folder until ``minutes`` of wall time are spent.

    ``working_spacing`` (mm) is recorded with the weights: the spacing the
    prepared folder was made at, which the wrapper then uses at inference.
    Writes ``out/last.pt``, ``out/best.pt`` (best mean validation Dice),
    ``out/metrics.jsonl``; returns the best record.
    """
    from avsm.core.sampling import warp
    from avsm.train.augment import AugmentConfig
    from avsm.train.data import PairDataset, load_prepared, validation_pairs
    from avsm.train.trainer import _mean_dice  # the AVSM trainer's validation Dice, so the two are comparable

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    vols = load_prepared(data)
    aug = AugmentConfig(**(augmentation or {}))
    ds = PairDataset(vols, iters_per_epoch, augment=True, augment_config=aug, seed=seed)
    val = validation_pairs(vols, val_per_volume, augment_config=aug)
    net = build_network()
    ncc, grad = _losses()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    t0 = time.time()
    best: dict[str, Any] | None = None
    epoch, step = 0, 0
    config = {"nb_features": list(NB_FEATURES), "integration_steps": 5, "lam": lam, "lr": lr, "seed": seed,
              "augmentation": dataclasses.asdict(aug), "data": str(data),
              "shape": list(vols[0].image.shape[2:]), "working_spacing": working_spacing}
    while (time.time() - t0) / 60.0 < minutes:
        ds.set_epoch(epoch)
        net.train()
        tl = []
        for i in range(len(ds)):
            item = ds[i]
            m, f = item["moving"][None], item["fixed"][None]
            vel, warped = net(m, f, return_warped_source=True, return_field_type="velocity")
            loss = -ncc(warped, f).mean() + lam * grad(vel).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tl.append(float(loss.detach()))
            step += 1
        net.eval()
        dices = []
        with torch.no_grad():
            for item in val:
                disp = net(item["moving"][None], item["fixed"][None])
                phi = voxel_displacement_to_unit_map(disp)
                lab = warp(item["moving_labels"][None].float(), phi, mode="nearest")
                dices.append(_mean_dice(lab[0, 0].long(), item["fixed_labels"][0]))
        rec = {"epoch": epoch, "step": step, "minutes": (time.time() - t0) / 60.0,
               "train_loss": float(np.mean(tl)), "val_dice": float(np.mean(dices))}
        with open(outp / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("voxelmorph epoch %d: %s", epoch, rec)
        state = {"config": config, "state_dict": net.state_dict(), "record": rec}
        _save(state, outp / "last.pt")
        if best is None or rec["val_dice"] > best["val_dice"]:
            best = rec
            _save(state, outp / "best.pt")
        epoch += 1
    assert best is not None
    return best


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def voxel_displacement_to_unit_map(disp: torch.Tensor) -> torch.Tensor:
    """``(B, 3, D, H, W)`` voxel displacement (tensor axis order) → unit-cube map (same grid)."""
    from avsm.core.coords import identity_map

    shape = tuple(int(s) for s in disp.shape[2:])
    scale = torch.tensor([1.0 / max(n - 1, 1) for n in shape], dtype=disp.dtype).view(1, 3, 1, 1, 1)
    return identity_map(shape, dtype=disp.dtype) + disp * scale


def displacement_to_world(disp: np.ndarray, grid: Grid) -> np.ndarray:
    """World LPS displacement (mm, channels x, y, z) from a voxel displacement in tensor axis order.

    Args:
        disp: ``(3, D, H, W)`` displacement in voxels along (D, H, W) = ITK (z, y, x).
        grid: the grid it lives on.

    Returns:
        ``(3, D, H, W)`` float64.
    """
    M = grid.index_to_world()[:3, :3]  # world = M @ [ix, iy, iz]
    d_xyz = disp[::-1].reshape(3, -1).astype(np.float64)
    return (M @ d_xyz).reshape(disp.shape)


def _load(weights: str | os.PathLike[str] | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = Path(weights) if weights else Path(os.environ.get("AVSM_VXM_WEIGHTS", str(DEFAULT_WEIGHTS)))
    if not path.is_file():
        raise MethodUnavailable(f"voxelmorph: no trained weights at {path} (scripts/train_voxelmorph.sh)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = state["config"]
    net = build_network(tuple(cfg["nb_features"]), int(cfg["integration_steps"]))
    net.load_state_dict(state["state_dict"])
    net.eval()
    return net, cfg


def voxelmorph(fixed: Volume, moving: Volume, *, weights: str | None = None, spacing: float | None = None,
               affine_spacing: float | None = 2.0, seed: int = 42, keep_warped: bool = False, **_: Any) -> FieldResult:
    """MI affine (SimpleITK) then the trained VoxelMorph network on the working pair.

    Args:
        fixed, moving: intensity volumes (any geometry).
        weights: trained weights (default ``$AVSM_VXM_WEIGHTS`` or :data:`DEFAULT_WEIGHTS`).
        spacing: working-grid spacing in mm; default: the one it was trained at
            (``working_spacing`` in the weights' config, 4.2 mm like AVSM's).
        affine_spacing: working spacing (mm) of the MI affine pre-alignment (that of the
            demons baseline, 2 mm; at the network's 4.2 mm the affine was less accurate).
        seed: affine sampling seed.
        keep_warped: keep the network's own warped image in ``info['tool_warped']``
            (and the affinely resampled input in ``info['moving_affine']``).

    Returns:
        :class:`FieldResult` without inverse.
    """
    from avsm.baselines.demons import affine_transform
    from avsm.baselines._convert import sitk_affine_matrix

    net, cfg = _load(weights)
    if spacing is None:
        spacing = float(cfg.get("working_spacing", 4.2))
    t0 = time.perf_counter()
    fw, mw = working_inputs(fixed, moving, spacing)
    if any(s % 8 for s in fw.grid.shape):
        raise ValueError(f"voxelmorph needs working sizes divisible by 8, got {fw.grid.shape}")
    timings = {"prepare": time.perf_counter() - t0}
    t1 = time.perf_counter()
    # the affine pre-alignment is the demons baseline's (Mattes MI on the ≈2 mm working pair)
    fa, ma = working_inputs(fixed, moving, affine_spacing) if affine_spacing != spacing else (fw, mw)
    A = sitk_affine_matrix(affine_transform(fa, ma, seed=seed))
    timings["affine"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    aff_only = FieldResult(fw.grid, mw.grid, WorldTransform(affine=A))
    m_aff = aff_only.warp(mw, onto=fw.grid)  # moving on the fixed working grid through the affine
    with torch.no_grad():
        src = torch.from_numpy(np.ascontiguousarray(m_aff.array, dtype=np.float32))[None, None]
        tgt = torch.from_numpy(np.ascontiguousarray(fw.array, dtype=np.float32))[None, None]
        disp, warped = net(src, tgt, return_warped_source=True)
    timings["network"] = time.perf_counter() - t2
    field = displacement_to_world(disp[0].double().numpy(), fw.grid)
    info: dict[str, Any] = {"weights_config": cfg}
    if keep_warped:
        info["tool_warped"] = Volume(warped[0, 0].numpy(), fw.grid)
        info["moving_affine"] = m_aff
        info["fixed_work"], info["moving_work"] = fw, mw
    timings["total"] = time.perf_counter() - t0
    if not math.isfinite(float(np.abs(field).max())):
        raise RuntimeError("voxelmorph produced a non-finite displacement")
    return FieldResult(fixed.grid, moving.grid, WorldTransform(affine=A, field_grid=fw.grid, field=field), None,
                       affine_forward=A, method="voxelmorph", timings=timings, info=info)
