"""Evaluation pairs (``pairs.csv``) and label correspondences between protocols."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass

from avsm.errors import AvsmError

__all__ = ["Pair", "read_pairs", "write_pairs", "read_label_mapping", "reverse_index"]

REQUIRED = ("moving", "fixed")
OPTIONAL = ("moving_labels", "fixed_labels", "label_mapping", "id")


@dataclass(frozen=True)
class Pair:
    """One registration pair (paths absolute after :func:`read_pairs`).

    Attributes:
        pair_id: unique id (the ``id`` column, else the 0-based row index as text).
        moving, fixed: image paths.
        moving_labels, fixed_labels: label map paths or ``None``.
        label_mapping: CSV of ``fixed_label,moving_label`` rows (``None``: same labels).
    """

    pair_id: str
    moving: str
    fixed: str
    moving_labels: str | None = None
    fixed_labels: str | None = None
    label_mapping: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def _resolve(base: str, p: str | None) -> str | None:
    if p is None or not str(p).strip():
        return None
    p = os.path.expanduser(str(p).strip())
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def read_pairs(path: str, label_mapping: str | None = None) -> list[Pair]:
    """Read ``pairs.csv``: columns ``moving, fixed[, moving_labels, fixed_labels, label_mapping, id]``.

    Relative paths are relative to the CSV's folder.  ``label_mapping`` (the
    ``--label-mapping`` option) applies to rows without their own.

    Raises:
        AvsmError: missing file or columns, duplicate ids, empty file.
    """
    if not os.path.isfile(path):
        raise AvsmError("pairs file not found", path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise AvsmError(f"pairs file lacks column(s) {', '.join(missing)} (has {', '.join(cols)})", path)
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise AvsmError("pairs file has no rows", path)
    default_map = os.path.abspath(label_mapping) if label_mapping else None
    out: list[Pair] = []
    for i, r in enumerate(rows):
        pid = r.get("id") or str(i)
        out.append(Pair(
            pair_id=pid,
            moving=_resolve(base, r["moving"]) or "",
            fixed=_resolve(base, r["fixed"]) or "",
            moving_labels=_resolve(base, r.get("moving_labels")),
            fixed_labels=_resolve(base, r.get("fixed_labels")),
            label_mapping=_resolve(base, r.get("label_mapping")) or default_map,
        ))
    ids = [p.pair_id for p in out]
    if len(set(ids)) != len(ids):
        raise AvsmError("pairs file has duplicate ids", path)
    return out


def write_pairs(pairs: list[Pair], path: str) -> None:
    """Write pairs as CSV (absolute paths)."""
    cols = ["id", "moving", "fixed", "moving_labels", "fixed_labels", "label_mapping"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for p in pairs:
            w.writerow([p.pair_id, p.moving, p.fixed, p.moving_labels or "", p.fixed_labels or "",
                        p.label_mapping or ""])


def read_label_mapping(path: str) -> dict[int, int]:
    """Label correspondences ``{fixed_label: moving_label}`` from a CSV.

    The file has a header row; the first column holds the fixed image's label
    values and the second the moving image's (further columns, e.g. a name,
    are ignored).

    Raises:
        AvsmError: unreadable file or non-integer values.
    """
    if not os.path.isfile(path):
        raise AvsmError("label mapping file not found", path)
    out: dict[int, int] = {}
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    for r in rows[1:]:
        if not r or not "".join(r).strip() or r[0].startswith("#"):
            continue
        try:
            out[int(r[0])] = int(r[1])
        except (ValueError, IndexError) as e:
            raise AvsmError(f"bad label mapping row {r!r} (need two integers)", path) from e
    if not out:
        raise AvsmError("label mapping has no rows", path)
    return out


def reverse_index(pairs: list[Pair]) -> dict[int, int]:
    """``{i: j}`` where pair ``j`` registers the same two images in the other direction."""
    key = {(os.path.realpath(p.fixed), os.path.realpath(p.moving)): i for i, p in enumerate(pairs)}
    out = {}
    for i, p in enumerate(pairs):
        j = key.get((os.path.realpath(p.moving), os.path.realpath(p.fixed)))
        if j is not None and j != i:
            out[i] = j
    return out
