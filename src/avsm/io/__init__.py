"""Image IO and world geometry (the only layer, with :mod:`avsm.export`, that knows mm)."""

from avsm.io.geometry import Grid, unit_affine_between
from avsm.io.image import (
    Volume,
    check_same_geometry,
    load_image,
    normalize_intensity,
    resample,
    save_image,
)
from avsm.io.masks import load_mask
from avsm.io.outputs import OutputTransaction, atomic_write_text

__all__ = [
    "Grid",
    "unit_affine_between",
    "Volume",
    "check_same_geometry",
    "load_image",
    "load_mask",
    "normalize_intensity",
    "resample",
    "save_image",
    "OutputTransaction",
    "atomic_write_text",
]
