"""Label correspondences and which labels Dice scores: one reader and one rule for every command.

Label-mapping file (``--label-mapping``, the ``label_mapping`` column of ``pairs.csv``): a CSV
whose first column is a label value of the **fixed** label map and whose second column is the
corresponding value of the **moving** map (``fixed_label,moving_label``); further columns
(e.g. a structure name) are ignored.  A header row is optional (it is recognised by its first
two cells not being integers); ``#`` lines and blank lines are skipped.

Dice rule (:func:`scored_labels`): without a mapping, the non-zero labels present in *both*
maps; with one, the labels it maps (fixed label → non-zero moving label), present or not
(a mapped label missing from the result scores 0; one absent from both maps is ignored by
:func:`avsm.metrics.overlap.mean_dice`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping

import numpy as np

from avsm.errors import AvsmError

__all__ = ["read_label_mapping", "scored_labels"]


def _int(cell: str) -> int | None:
    try:
        return int(cell.strip())
    except ValueError:
        return None


def read_label_mapping(path: str | os.PathLike[str]) -> dict[int, int]:
    """Read a label-mapping CSV into ``{fixed_label: moving_label}`` (header optional).

    Raises:
        AvsmError: unreadable file, a row without two integers (other than a header as the
            first row), a fixed label mapped twice to different values, or no rows.
    """
    out: dict[int, int] = {}
    seen_row = False
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                first = not seen_row
                seen_row = True
                a = _int(row[0])
                b = _int(row[1]) if len(row) > 1 else None
                if a is None or b is None:
                    if first and a is None and (len(row) < 2 or b is None):
                        continue  # a header: neither of its first two cells is a number
                    raise AvsmError(f"line {line_no}: need two integers fixed_label,moving_label, "
                                    f"got {','.join(row)!r}", path)
                if a in out and out[a] != b:
                    raise AvsmError(f"line {line_no}: fixed label {a} is mapped twice ({out[a]} and {b})", path)
                out[a] = b
    except OSError as e:
        raise AvsmError(f"cannot read label mapping: {e.strerror or e}", path) from e
    except UnicodeDecodeError as e:
        raise AvsmError("label mapping is not a text (CSV) file", path) from e
    if not out:
        raise AvsmError("label mapping has no rows", path)
    return out


def scored_labels(fixed_labels: np.ndarray, moving_labels: np.ndarray,
                  mapping: Mapping[int, int] | None = None) -> list[int]:
    """The fixed labels Dice is computed for (the one rule of ``register`` and ``evaluate``).

    Args:
        fixed_labels: label array of the fixed image (any shape).
        moving_labels: label array of the moving image (any shape; only its values are used).
        mapping: ``{fixed_label: moving_label}`` or ``None``/empty (same protocol).

    Returns:
        Sorted fixed labels: with a mapping, every non-zero fixed label mapped to a non-zero
        moving label; without one, the non-zero labels present in both arrays.
    """
    if mapping:
        return sorted(int(k) for k, v in mapping.items() if int(k) != 0 and int(v) != 0)
    fixed = {int(v) for v in np.unique(fixed_labels)} - {0}
    moving = {int(v) for v in np.unique(moving_labels)} - {0}
    return sorted(fixed & moving)
