"""Fast NIfTI-1 writing of large arrays (outputs of big registrations), without copies.

SimpleITK needs a full copy of the array and compresses with deflate, about 22 MB/s
on this project's machines; a 512×512×300 displacement field (943 MB) then takes
40 s to write.  This writer streams the array's bytes as they lie in memory (our
``(C, D, H, W)`` C-order arrays are exactly NIfTI's ``(X, Y, Z, 1, C)`` Fortran order)
into one standard gzip member (RFC 1952, what every NIfTI reader opens):

* ``level=1`` (default, images and displacement fields): fast deflate.  With the optional
  ``isal`` package (ISA-L, ``pip install isal`` or the ``fast-io`` extra) its level 1;
  otherwise zlib level 1 with run-length matching only (``Z_RLE``: Huffman coding plus
  runs, which the zero background of images and label maps is made of), compressed in
  16 MB pieces on ``torch.get_num_threads()`` threads and joined into one deflate stream
  (each piece is a raw deflate stream ending on a byte boundary with a sync flush, and
  run-length matches never reach into the previous piece, so the pieces are independent,
  as in ``pigz``);
* ``level=0``: stored deflate blocks (no compression, disk speed).

Measured on the outputs of a 1 mm OASIS-TRT-20 pair (256×256×160; the two ANTs fields are
126 MB of float32 each, the warped image 42 MB of float32, the warped labels 42 MB of
int32; ``benchmarks/profile_outputs.py``), size in MB / CPU seconds, one thread, niced
beside another job:

==========================  ============  ==================  ============  ============
deflate                     ``1Warp``     ``1InverseWarp``    image         labels
==========================  ============  ==================  ============  ============
stored (level 0)            125.8 / 0.2   125.8 / 0.2         42 / 0.1      42 / 0.1
zlib 1, Huffman-only        98.8 / 1.1    108.3 / 1.4         10.6 / 0.37   5.7 / 0.29
zlib 1, run-length          98.7 / 1.3    108.3 / 1.2         5.6 / 0.14    1.2 / 0.12
zlib 1 (LZ77)               94.5 / 3.1    107.7 / 4.0         5.9 / 0.24    0.8 / 0.10
zlib 6 (gzip's default)     93.3 / 15.0   107.1 / 10.5
isal 1                      99.1 / 0.66   110.3 / 0.54        5.7 / 0.07    0.7 / 0.01
==========================  ============  ==================  ============  ============

zlib's LZ77 levels cost 2.5–12× more on the fields for 1–6 % smaller files; run-length
coding keeps Huffman-only's field sizes and halves the images; ISA-L does as well at
about the cost of storing.

Headers (q-form and s-form, code 1, from the grid; LPS → RAS) come from nibabel.
"""

from __future__ import annotations

import collections
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import BinaryIO

import numpy as np

from avsm.errors import AvsmError
from avsm.io.geometry import Grid

__all__ = ["write_nifti", "deflate_backend"]

_CHUNK = 1 << 24  # bytes per compression call (and per parallel piece)


def _load_isal() -> ModuleType | None:
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib


#: ISA-L's zlib-compatible module when the optional ``isal`` package is installed
_ISAL: ModuleType | None = _load_isal()


def deflate_backend() -> str:
    """Which compressor ``level=1`` uses: ``"isal"`` or ``"zlib"`` (run-length, threaded)."""
    return "isal" if _ISAL is not None else "zlib"


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


def _pieces(head: bytes, flat: np.ndarray) -> Iterator[bytes | memoryview]:
    """The file's bytes: the header, then the array in ``_CHUNK``-byte views (no copies)."""
    yield head
    view = memoryview(flat)
    for i in range(0, flat.size, _CHUNK):
        yield view[i:i + _CHUNK]


def _rle_piece(data: bytes | memoryview, last: bool) -> bytes:
    """Raw deflate (zlib level 1, run-length matches only) of one piece, ending byte-aligned (sync
    flush) unless ``last``: it never refers to the bytes of another piece."""
    z = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return z.compress(data) + z.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _write_gzip_threaded(fh: BinaryIO, head: bytes, flat: np.ndarray, threads: int) -> None:
    """One gzip member whose deflate stream is the pieces' run-length streams, made on ``threads``.

    At most ``2 * threads`` pieces are in flight, so the memory is a few pieces, not the file.
    """
    pieces = list(_pieces(head, flat))
    fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip, deflate, no name, mtime 0, OS unknown
    crc, size = 0, 0
    pending: collections.deque[Future[bytes]] = collections.deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, piece in enumerate(pieces):
            pending.append(pool.submit(_rle_piece, piece, i == len(pieces) - 1))
            crc = zlib.crc32(piece, crc)  # releases the GIL too
            size += len(piece)
            while len(pending) >= 2 * threads:
                fh.write(pending.popleft().result())
        while pending:
            fh.write(pending.popleft().result())
    fh.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


def _threads() -> int:
    try:
        import torch

        return max(1, int(torch.get_num_threads()))
    except ImportError:  # pragma: no cover - torch is a dependency
        return 1


def write_nifti(array: np.ndarray, grid: Grid, path: str | os.PathLike[str], *, vector: bool = False,
                level: int = 1, final: str | None = None) -> None:
    """Write a ``(D, H, W)`` image or a ``(3, D, H, W)`` vector field as NIfTI-1 (``.nii`` or ``.nii.gz``).

    Args:
        array: C-contiguous array on ``grid``; a vector field's channels are LPS mm
            components (ITK/ANTs convention: written as they are, ``intent_code`` 1007,
            dims ``(X, Y, Z, 1, 3)``).
        grid: the array's geometry.
        path: output file; ``.gz`` ending → one gzip member.
        vector: ``array`` is a ``(3, D, H, W)`` vector field.
        level: 1 = fast deflate (isal level 1 if installed, else zlib run-length coding on
            ``torch.get_num_threads()`` threads), 0 = stored deflate blocks.
        final: name for error messages (default ``path``).

    Raises:
        AvsmError: the file cannot be written.
        ValueError: shape or layout mismatch, or an unknown level.
    """
    path = os.fspath(path)
    if level not in (0, 1):
        raise ValueError(f"level must be 0 (stored) or 1 (fast deflate), got {level}")
    want = (3, *grid.shape) if vector else tuple(grid.shape)
    if tuple(array.shape) != want or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous array of shape {want}, got {array.shape}")
    D, H, W = grid.shape
    shape_xyz = (W, H, D, 1, 3) if vector else (W, H, D)
    head = _header(shape_xyz, array.dtype, grid, vector)
    flat = array.reshape(-1).view(np.uint8)
    try:
        with open(path, "wb") as fh:
            if not path.lower().endswith(".gz"):
                for piece in _pieces(head, flat):
                    fh.write(piece)
            elif level == 1 and _ISAL is None:
                _write_gzip_threaded(fh, head, flat, _threads())
            else:
                zmod = _ISAL if level == 1 else zlib
                assert zmod is not None
                z = zmod.compressobj(level, zmod.DEFLATED, 31)
                for piece in _pieces(head, flat):
                    fh.write(z.compress(piece))
                fh.write(z.flush())
    except OSError as e:
        raise AvsmError(f"cannot write image ({e.strerror or e})", final or path) from e
