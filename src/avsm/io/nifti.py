"""Fast NIfTI-1 writing of large arrays (outputs of big registrations), without copies.

SimpleITK needs a full copy of the array and compresses with deflate, about 22 MB/s
on this project's machines; a 512×512×300 displacement field (943 MB) then takes
40 s to write for an 8 % smaller file.  This writer streams the array's bytes as
they lie in memory (our ``(C, D, H, W)`` C-order arrays are exactly NIfTI's
``(X, Y, Z, 1, C)`` Fortran order) through ``zlib`` in chunks:

* ``level=0`` (displacement fields): stored deflate blocks, a valid ``.nii.gz``
  that any reader opens, 8 % larger than compressed, written at disk speed;
* ``level=1`` with Huffman-only coding (images): about 2.3× faster than ``gzip -1``
  at the same size.

Headers (q-form and s-form, code 1, from the grid; LPS → RAS) come from nibabel.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from avsm.errors import AvsmError
from avsm.io.geometry import Grid

__all__ = ["write_nifti"]

_CHUNK = 1 << 24  # bytes per zlib call


def _header(shape_xyz: tuple[int, ...], dtype: np.dtype, grid: Grid, vector: bool) -> bytes:
    import nibabel as nib

    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.index_to_world()
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape_xyz)
    hdr.set_qform(ras, code=1)
    hdr.set_sform(ras, code=1)
    hdr.set_xyzt_units("mm")
    if vector:
        hdr.set_intent("vector", (), "")
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00" * 4  # 348-byte header + empty extension flag


def write_nifti(array: np.ndarray, grid: Grid, path: str | os.PathLike[str], *, vector: bool = False,
                level: int = 1, final: str | None = None) -> None:
    """Write a ``(D, H, W)`` image or a ``(3, D, H, W)`` vector field as NIfTI-1 (``.nii`` or ``.nii.gz``).

    Args:
        array: C-contiguous array on ``grid``; a vector field's channels are LPS mm
            components (ITK/ANTs convention: written as they are, ``intent_code`` 1007,
            dims ``(X, Y, Z, 1, 3)``).
        grid: the array's geometry.
        path: output file; ``.gz`` ending → gzip stream.
        vector: ``array`` is a ``(3, D, H, W)`` vector field.
        level: 0 = stored deflate blocks (fast, for incompressible float fields), 1 =
            Huffman-only deflate.
        final: name for error messages (default ``path``).

    Raises:
        AvsmError: the file cannot be written.
        ValueError: shape or layout mismatch.
    """
    path = os.fspath(path)
    want = (3, *grid.shape) if vector else tuple(grid.shape)
    if tuple(array.shape) != want or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous array of shape {want}, got {array.shape}")
    D, H, W = grid.shape
    shape_xyz = (W, H, D, 1, 3) if vector else (W, H, D)
    head = _header(shape_xyz, array.dtype, grid, vector)
    flat = array.reshape(-1).view(np.uint8)
    try:
        with open(path, "wb") as fh:
            if path.lower().endswith(".gz"):
                strategy = zlib.Z_DEFAULT_STRATEGY if level == 0 else zlib.Z_HUFFMAN_ONLY
                z = zlib.compressobj(0 if level == 0 else 1, zlib.DEFLATED, 31, 9, strategy)
                fh.write(z.compress(head))
                for i in range(0, flat.size, _CHUNK):
                    fh.write(z.compress(flat[i:i + _CHUNK]))
                fh.write(z.flush())
            else:
                fh.write(head)
                for i in range(0, flat.size, _CHUNK):
                    fh.write(flat[i:i + _CHUNK])
    except OSError as e:
        raise AvsmError(f"cannot write image ({e.strerror or e})", final or path) from e
