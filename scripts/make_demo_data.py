#!/usr/bin/env python
"""Make avsm's bundled demo pair and the small test fixtures from the shared real volumes.

Usage::

    PYTHONPATH=src python scripts/make_demo_data.py --shared /work/shared/data \
        [--demo-out src/avsm/data/demo] [--tests-out tests/data]

Outputs (all resampled with SimpleITK in world coordinates, original direction kept):

* demo (``--demo-out``): Colin27 (moving) and MNI ICBM 2009c (fixed) skull-stripped
  brains at 2.5 mm isotropic, cropped to the brain bounding box plus a margin,
  with their label maps reduced to the 12 subcortical structures both atlases share
  (values 1..12, uint8), ``labels.csv`` and ``README.md``.
* test fixtures (``--tests-out``): the same two brains and labels at 4 mm over the
  full field of view; ``itk_t1`` at about 4x4x3 mm (coronal, real direction);
  ``radiomics_brain1`` at about 3x3x6.5 mm as NRRD; and ``README.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from avsm.io.geometry import Grid
from avsm.io.image import Volume, load_image, resample, save_image
from avsm.io.outputs import atomic_write_text

logger = logging.getLogger("make_demo_data")

#: The 12 structures shared by AAL (Colin27) and aseg (MNI 2009c), in the shared README's order.
STRUCTURES: list[tuple[int, str, int, int]] = [
    # (demo value, name, AAL value, aseg value)
    (1, "thalamus_L", 77, 10),
    (2, "thalamus_R", 78, 49),
    (3, "caudate_L", 71, 11),
    (4, "caudate_R", 72, 50),
    (5, "putamen_L", 73, 12),
    (6, "putamen_R", 74, 51),
    (7, "pallidum_L", 75, 13),
    (8, "pallidum_R", 76, 52),
    (9, "hippocampus_L", 37, 17),
    (10, "hippocampus_R", 38, 53),
    (11, "amygdala_L", 41, 18),
    (12, "amygdala_R", 42, 54),
]

DEMO_SPACING_MM = 2.5
DEMO_MARGIN_MM = 5.0
FIXTURE_SPACING_MM = 4.0


def map_labels(array: np.ndarray, atlas: str) -> np.ndarray:
    """Map atlas label values to the 12 shared structures (1..12), everything else 0.

    Args:
        array: integer label array, any shape.
        atlas: ``"aal"`` (Colin27) or ``"aseg"`` (MNI 2009c DKT/aseg).

    Returns:
        ``uint8`` array of the same shape.
    """
    column = {"aal": 2, "aseg": 3}[atlas]
    lut = np.zeros(int(array.max()) + 1, dtype=np.uint8)
    for row in STRUCTURES:
        if row[column] < lut.size:
            lut[row[column]] = row[0]
    out = lut[np.clip(array, 0, lut.size - 1)]
    out[array < 0] = 0
    return out


def check_label_names(shared: Path) -> None:
    """Check the label values above against the atlases' own name tables."""
    aal = {}
    for line in (shared / "aal_labels.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            aal[int(parts[0])] = parts[1]
    aseg = {}
    for line in (shared / "dkt_labels.csv").read_text(encoding="utf-8-sig").splitlines()[1:]:
        name, _, value = line.strip().rpartition(",")
        if value.strip().isdigit():
            aseg[int(value)] = name
    for _, name, a, s in STRUCTURES:
        structure, side = name.split("_")
        side_word = {"L": "Left", "R": "Right"}[side]
        if aal.get(a, "").lower() != f"{structure}_{side}".lower():
            raise SystemExit(f"AAL value {a} is {aal.get(a)!r}, expected {name}")
        if aseg.get(s, "").lower() != f"{side_word}-{structure}".lower():
            raise SystemExit(f"aseg value {s} is {aseg.get(s)!r}, expected {side_word}-{structure}")


def crop_grid(volume: Volume, spacing_mm: float, margin_mm: float) -> Grid:
    """Grid with the volume's direction, isotropic ``spacing_mm``, over the non-zero bounding box.

    Args:
        volume: skull-stripped brain (background exactly 0).
        spacing_mm: output spacing.
        margin_mm: margin added on every side of the bounding box.
    """
    g = volume.grid
    nz = np.nonzero(volume.array)
    lo_t = np.array([a.min() for a in nz], dtype=np.float64)  # tensor order (z, y, x)
    hi_t = np.array([a.max() for a in nz], dtype=np.float64)
    lo, hi = lo_t[::-1], hi_t[::-1]  # ITK order (x, y, z)
    sp = np.asarray(g.spacing)
    start = lo - margin_mm / sp  # continuous ITK index of the first output voxel centre
    extent_mm = (hi - lo) * sp + 2 * margin_mm
    size = [int(math.ceil(e / spacing_mm - 1e-6)) + 1 for e in extent_mm]
    origin = g.index_to_world() @ np.append(start, 1.0)
    return Grid(
        shape=(size[2], size[1], size[0]),
        spacing=(spacing_mm,) * 3,
        origin=tuple(origin[:3]),
        direction=g.direction,
    )


def fov_grid(grid: Grid, spacing_mm: float) -> Grid:
    """Same origin and direction as ``grid``, isotropic ``spacing_mm``, covering its field of view."""
    size = [int(math.floor(e / spacing_mm + 1e-6)) + 1 for e in grid.extent_mm]
    return Grid(
        shape=(size[2], size[1], size[0]),
        spacing=(spacing_mm,) * 3,
        origin=grid.origin,
        direction=grid.direction,
    )


def to_dtype(volume: Volume, dtype: np.dtype) -> Volume:
    """Round (for integer dtypes) and cast an interpolated intensity volume."""
    arr = volume.array
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return volume.with_array(arr.astype(dtype))


def make_pair(shared: Path, out: Path, grids: dict[str, Grid], names: dict[str, str]) -> None:
    """Resample both brains and their mapped labels onto the given grids and save them."""
    for key, brain, labels, atlas in (
        ("colin", "colin27_brain.nii.gz", "colin27_aal.nii.gz", "aal"),
        ("mni", "mni2009c_brain.nii.gz", "mni2009c_dkt.nii.gz", "aseg"),
    ):
        img = sitk.ReadImage(str(shared / brain))
        dtype = sitk.GetArrayViewFromImage(img).dtype
        vol = load_image(shared / brain)
        lab = load_image(shared / labels, label=True)
        grid = grids[key]
        warped = to_dtype(resample(vol, grid, interpolation="linear"), dtype)
        mapped = Volume(map_labels(lab.array, atlas), lab.grid, is_label=True)
        warped_lab = resample(mapped, grid, interpolation="nearest")
        save_image(warped, out / names[key])
        save_image(warped_lab, out / names[key + "_labels"])
        present = sorted(int(v) for v in np.unique(warped_lab.array) if v)
        logger.info("%s: shape %s spacing %s labels %s", names[key], grid.shape, grid.spacing, present)
        if present != list(range(1, 13)):
            raise SystemExit(f"{names[key]}: not all 12 structures survived resampling: {present}")


SOURCES_MD = """\
| file here | source (shared name) | original package and path | licence as stated |
|---|---|---|---|
| Colin27 brain | `colin27_brain.nii.gz` (181×217×181, 1 mm) | Debian: mricron-data 1.2.20211006, `usr/share/mricron/templates/ch2bet.nii.gz` | package BSD-3; Colin27 © MNI, permissive notice |
| Colin27 labels | `colin27_aal.nii.gz` (AAL, 116 regions, hand-drawn on this subject) | same package, `aal.nii.gz`, `aal.nii.txt` | same |
| MNI 2009c brain | `mni2009c_brain.nii.gz` (ICBM 2009c nonlinear asymmetric, skull-stripped, 193×229×193, 1 mm) | PyPI: atlaspy 0.0.17 (sdist), `atlaspy/source_data/atlases/niftis/tpl-MNI152NLin2009cAsym_res-01_desc-brain_T1w.nii.gz` | package MIT; MNI permissive notice |
| MNI 2009c labels | `mni2009c_dkt.nii.gz` (DKT cortex + aseg subcortical) | same package, `niftis/dkt.nii.gz`, `luts/dkt.csv` | same |
"""

STRUCTURES_MD = "| value | structure | AAL value (Colin27) | aseg value (MNI 2009c) |\n|---|---|---|---|\n" + "".join(
    f"| {v} | {n} | {a} | {s} |\n" for v, n, a, s in STRUCTURES
)


def write_demo_readme(out: Path, grids: dict[str, Grid]) -> None:
    script = Path(__file__).read_text()
    text = f"""# avsm demo pair

Two real skull-stripped T1 brains of **different subjects**, each with labels of
the 12 subcortical structures that both of their atlases contain.

| file | what | shape (D, H, W) | spacing (mm) |
|---|---|---|---|
| `moving.nii.gz` | Colin27 brain (one real person, average of 27 scans), uint8 | {grids['colin'].shape} | {DEMO_SPACING_MM} |
| `moving_labels.nii.gz` | its AAL labels mapped to the 12 structures, uint8 | same | same |
| `fixed.nii.gz` | MNI ICBM 2009c nonlinear asymmetric template brain, int16 | {grids['mni'].shape} | {DEMO_SPACING_MM} |
| `fixed_labels.nii.gz` | its aseg labels mapped to the 12 structures, uint8 | same | same |
| `labels.csv` | value,name of the 12 structures | | |

Both volumes already sit close to MNI space, so the pair mostly tests the
deformable stage. The two atlases were drawn under different protocols (AAL's
caudate, for instance, is about twice the size of aseg's), so Dice between them
has a ceiling well below 1. At 1 mm, mean Dice over the 12 structures was about
0.58 without registration.

## Provenance and licences

{SOURCES_MD}
Apart from being renamed (and `mni2009c_dkt` stored as int16), the shared copies are
unchanged from these packages.

## Labels

{STRUCTURES_MD}
Every other label is set to 0.

## How it was made

`scripts/make_demo_data.py` (in the avsm source tree):

1. Read each brain with SimpleITK. Its bounding box of non-zero voxels, plus
   {DEMO_MARGIN_MM:g} mm on every side, defines a {DEMO_SPACING_MM} mm isotropic grid
   with the original direction (RAS-stored NIfTI, LPS direction diag(-1, -1, 1)).
2. Resample the brain onto that grid with linear interpolation in world
   coordinates (identity transform). Round the values to the original dtype.
3. Map the label map to the 12 structures at full resolution, then resample it
   onto the same grid with nearest-neighbour interpolation (uint8).

The script:

```python
{script}```
"""
    atomic_write_text(out / "README.md", text)


def write_tests_readme(out: Path) -> None:
    text = f"""# Test fixtures

Small real volumes for avsm's tests, made by `scripts/make_demo_data.py` from the
project's shared data (see the provenance below). All resampling was done with
SimpleITK in world coordinates with the identity transform, keeping each image's
original direction; intensities use linear interpolation rounded to the original
dtype, labels nearest neighbour.

| file | what |
|---|---|
| `colin_4mm.nii.gz`, `colin_4mm_labels.nii.gz` | Colin27 skull-stripped brain (uint8) and its AAL labels mapped to the 12 shared structures (uint8), 4 mm isotropic over the full field of view, LPS direction diag(-1, -1, 1) |
| `mni_4mm.nii.gz`, `mni_4mm_labels.nii.gz` | MNI ICBM 2009c brain (int16) and its aseg labels mapped to the 12 structures, same treatment |
| `itk_t1.nii.gz` | a real individual whole-head T1, coronal acquisition (direction rows (1,0,0), (0,0,-1), (0,1,0)), int16, 128×128×62 at 2×2×3 mm reduced to 64×64×62 (about 4.03×4.03×3 mm; first and last voxel centres kept) |
| `radiomics_brain1.nrrd` | a real post-contrast brain MRI with thick slices, int16, NRRD, 256×256×25 at 0.78×0.78×6.5 mm reduced to 67×67×25 (about 3×3×6.5 mm; first and last voxel centres kept) |

## Labels

{STRUCTURES_MD}
## Provenance and licences

{SOURCES_MD}| `itk_t1.nii.gz` | `itk_t1.nii.gz` | Debian: insighttoolkit5-examples 5.2.1, `examples/Data/KmeansTest_T1UCharRaw.nii.gz` | Apache-2.0 |
| `radiomics_brain1.nrrd` | `radiomics_brain1.nrrd` | PyPI: pyradiomics 3.0.1 (sdist), `data/brain1_image.nrrd` | BSD-3 |
"""
    atomic_write_text(out / "README.md", text)


def make_demo(shared: Path, out: Path) -> None:
    grids = {
        "colin": crop_grid(load_image(shared / "colin27_brain.nii.gz"), DEMO_SPACING_MM, DEMO_MARGIN_MM),
        "mni": crop_grid(load_image(shared / "mni2009c_brain.nii.gz"), DEMO_SPACING_MM, DEMO_MARGIN_MM),
    }
    names = {
        "colin": "moving.nii.gz",
        "colin_labels": "moving_labels.nii.gz",
        "mni": "fixed.nii.gz",
        "mni_labels": "fixed_labels.nii.gz",
    }
    make_pair(shared, out, grids, names)
    atomic_write_text(out / "labels.csv", "value,name\n" + "".join(f"{v},{n}\n" for v, n, _, _ in STRUCTURES))
    write_demo_readme(out, grids)


def make_fixtures(shared: Path, out: Path) -> None:
    grids = {
        "colin": fov_grid(load_image(shared / "colin27_brain.nii.gz").grid, FIXTURE_SPACING_MM),
        "mni": fov_grid(load_image(shared / "mni2009c_brain.nii.gz").grid, FIXTURE_SPACING_MM),
    }
    names = {
        "colin": "colin_4mm.nii.gz",
        "colin_labels": "colin_4mm_labels.nii.gz",
        "mni": "mni_4mm.nii.gz",
        "mni_labels": "mni_4mm_labels.nii.gz",
    }
    make_pair(shared, out, grids, names)

    itk = load_image(shared / "itk_t1.nii.gz")
    g = itk.grid.resized((itk.grid.shape[0], 64, 64))
    save_image(to_dtype(resample(itk, g), np.dtype(np.int16)), out / "itk_t1.nii.gz")
    logger.info("itk_t1.nii.gz: shape %s spacing %s", g.shape, g.spacing)

    rad = load_image(shared / "radiomics_brain1.nrrd")
    g = rad.grid.resized((rad.grid.shape[0], 67, 67))
    save_image(to_dtype(resample(rad, g), np.dtype(np.int16)), out / "radiomics_brain1.nrrd")
    logger.info("radiomics_brain1.nrrd: shape %s spacing %s", g.shape, g.spacing)
    write_tests_readme(out)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, required=True, help="folder with the shared real volumes")
    ap.add_argument("--demo-out", type=Path, default=root / "src" / "avsm" / "data" / "demo")
    ap.add_argument("--tests-out", type=Path, default=root / "tests" / "data")
    ap.add_argument("--skip-tests", action="store_true", help="only make the demo pair")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_label_names(args.shared)
    make_demo(args.shared, args.demo_out)
    if not args.skip_tests:
        make_fixtures(args.shared, args.tests_out)
    for folder in (args.demo_out, args.tests_out):
        if folder.exists():
            total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            logger.info("%s: %.0f kB", os.path.relpath(folder), total / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
