"""Data bundled with avsm: a small real demo pair (see ``demo/README.md``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["demo_paths", "DEMO_FILES"]

#: Keys of :func:`demo_paths` and the file names they point to.
DEMO_FILES: dict[str, str] = {
    "moving": "moving.nii.gz",
    "moving_labels": "moving_labels.nii.gz",
    "fixed": "fixed.nii.gz",
    "fixed_labels": "fixed_labels.nii.gz",
    "labels_csv": "labels.csv",
    "readme": "README.md",
}


def demo_paths() -> dict[str, Path]:
    """Paths of the bundled demo pair.

    The moving image is Colin27, the fixed one the MNI ICBM 2009c template,
    both skull-stripped at 2.5 mm; the label maps hold the 12 shared
    subcortical structures (values 1..12, names in ``labels.csv``).

    Returns:
        ``{"moving", "moving_labels", "fixed", "fixed_labels", "labels_csv",
        "readme"}`` -> file path on disk.

    Raises:
        FileNotFoundError: the package data is missing, or the package is not
            installed on a regular file system (e.g. inside a zip).
    """
    demo = resources.files(__name__).joinpath("demo")
    paths: dict[str, Path] = {}
    for key, name in DEMO_FILES.items():
        p = Path(str(demo.joinpath(name)))
        if not p.is_file():
            raise FileNotFoundError(f"avsm demo file missing: {p}")
        paths[key] = p
    return paths
