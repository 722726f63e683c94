"""avsm's own compact transform file: the affine, the low-resolution velocities and their grids.

A registration by avsm is fully determined by its affine ``(A, b)`` (working unit
coordinates of the two images) and its vSVF steps (low-resolution velocities and the
integrator that ran them, :class:`avsm.models.vsvf.VelocityStep`).  This file stores
exactly that, with the geometry of the four grids involved (the two working grids
and the two images' own grids), so :func:`load_compact` regenerates the forward and
the inverse maps with the same code that made them
(:meth:`avsm.transform.RegistrationResult.from_steps`), on any reference grid.

The file is a NumPy ``.npz`` archive (no pickles) holding:

* ``meta``: a JSON string ``{"format": "avsm-transform", "version": 1, "method",
  "grids": {name: {"shape", "spacing", "origin", "direction"}}, "steps": [{"method",
  "steps", "squarings"}], "convention"}``;
* ``A`` ``(1, 3, 3)`` and ``b`` ``(1, 3)`` float32: fixed → moving working unit coordinates
  (centred form, see :mod:`avsm.core.coords`);
* ``v0``, ``v1``, … ``(1, 3, d, h, w)`` float32: the velocities, in the order applied.

A 2 mm brain pair takes about 1–5 MB (one to three steps), whatever the images' size.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np
import torch

from avsm.errors import AvsmError
from avsm.io.geometry import Grid
from avsm.models.vsvf import INTEGRATORS, VelocityStep
from avsm.transform import RegistrationResult

__all__ = ["COMPACT_SUFFIX", "is_compact", "save_compact", "load_compact"]

#: file-name ending of compact transform files
COMPACT_SUFFIX = ".npz"
_FORMAT = "avsm-transform"
_VERSION = 1
_GRIDS = ("fixed_grid", "moving_grid", "fixed_original", "moving_original")
_CONVENTION = ("pull-back: fixed LPS mm -> moving LPS mm; phi = affine o exp(-v0) o exp(-v1) ...; "
               "inverse = exp(vk) o ... o exp(v0) o affine^-1; unit cube [0,1]^3, align_corners=True")


def is_compact(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a compact transform file (by its ``.npz`` ending)."""
    return os.fspath(path).lower().endswith(COMPACT_SUFFIX)


def _grid_dict(g: Grid) -> dict[str, Any]:
    return {"shape": list(g.shape), "spacing": list(g.spacing), "origin": list(g.origin),
            "direction": list(g.direction)}


def save_compact(result: RegistrationResult, path: str | os.PathLike[str]) -> None:
    """Write ``result`` as a compact transform file at ``path`` (ending in ``.npz``).

    Raises:
        AvsmError: ``path`` does not end in ``.npz``, or cannot be written.
    """
    path = os.fspath(path)
    if not is_compact(path):
        raise AvsmError("a compact transform file must end in .npz", path)
    err = result.steps_error()
    if err > 1e-5:
        raise AvsmError(f"this result's map is not its affine and velocity steps (differs by {err:.2g} "
                        "unit); no compact file can describe it", path)
    meta = {
        "format": _FORMAT, "version": _VERSION, "method": result.method, "convention": _CONVENTION,
        "grids": {name: _grid_dict(getattr(result, name)) for name in _GRIDS},
        "steps": [{"method": st.method, "steps": int(st.steps), "squarings": int(st.squarings)}
                  for st in result.steps],
    }
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta)),
        "A": result.A.detach().cpu().float().numpy(),
        "b": result.b.detach().cpu().float().numpy(),
    }
    for i, st in enumerate(result.steps):
        arrays[f"v{i}"] = st.v.detach().cpu().float().numpy()
    try:
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
    except OSError as e:
        raise AvsmError(f"cannot write transform file ({e.strerror or e})", path) from e


def load_compact(path: str | os.PathLike[str]) -> RegistrationResult:
    """Read a compact transform file; its maps are regenerated from the stored velocities.

    Returns:
        A :class:`~avsm.transform.RegistrationResult` (``warp``, ``world_map``,
        ``jacobian_determinant`` on any grid, forward and inverse).

    Raises:
        AvsmError: missing file, not an avsm transform file, unknown version, or
            inconsistent contents (one line naming the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AvsmError("transform file not found", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise AvsmError("not an avsm transform file (unreadable .npz)", path) from e
    try:
        meta = json.loads(str(data["meta"]))
    except (KeyError, ValueError) as e:
        raise AvsmError("not an avsm transform file (no metadata)", path) from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise AvsmError("not an avsm transform file", path)
    if meta.get("version") != _VERSION:
        raise AvsmError(f"avsm transform file version {meta.get('version')} is not supported "
                        f"(this avsm reads version {_VERSION})", path)
    try:
        grids = {name: Grid(**meta["grids"][name]) for name in _GRIDS}
        A = torch.from_numpy(np.asarray(data["A"], dtype=np.float32))
        b = torch.from_numpy(np.asarray(data["b"], dtype=np.float32))
        steps = []
        for i, sm in enumerate(meta["steps"]):
            v = torch.from_numpy(np.asarray(data[f"v{i}"], dtype=np.float32))
            if sm["method"] not in INTEGRATORS or v.dim() != 5 or tuple(v.shape[:2]) != (1, 3):
                raise ValueError(f"step {i}: bad integrator or velocity shape {tuple(v.shape)}")
            steps.append(VelocityStep(v=v, method=sm["method"], steps=int(sm["steps"]),
                                      squarings=int(sm["squarings"])))
        if tuple(A.shape) != (1, 3, 3) or tuple(b.shape) != (1, 3):
            raise ValueError(f"affine of shape {tuple(A.shape)}, {tuple(b.shape)}")
    except (KeyError, TypeError, ValueError) as e:
        raise AvsmError(f"corrupt avsm transform file ({e})", path) from e
    return RegistrationResult.from_steps(A=A, b=b, steps=steps, method=str(meta.get("method", "")), **grids)
