"""Evaluation pairs: the one ``pairs.csv`` format (:mod:`avsm.batch`) and label correspondences.

``avsm evaluate`` and ``avsm register --pairs`` read the same file with the same reader
(:func:`avsm.batch.read_pairs`; columns ``moving, fixed`` and optionally ``name`` (or
``id``), ``moving_labels``, ``fixed_labels``, ``label_mapping``, ``fixed_mask``,
``moving_mask``) and the same label-mapping reader (:func:`avsm.labels.read_label_mapping`,
header optional).  :class:`Pair` is :class:`avsm.batch.PairSpec` (``pair_id`` is its name).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from avsm.batch import PairSpec, read_pairs, write_pairs
from avsm.labels import read_label_mapping

__all__ = ["Pair", "read_pairs", "write_pairs", "read_label_mapping", "reverse_index"]

#: One registration pair (an alias of :class:`avsm.batch.PairSpec`).
Pair = PairSpec


def reverse_index(pairs: Sequence[Pair]) -> dict[int, int]:
    """``{i: j}`` where pair ``j`` registers the same two images in the other direction."""
    key = {(os.path.realpath(p.fixed), os.path.realpath(p.moving)): i for i, p in enumerate(pairs)}
    out = {}
    for i, p in enumerate(pairs):
        j = key.get((os.path.realpath(p.moving), os.path.realpath(p.fixed)))
        if j is not None and j != i:
            out[i] = j
    return out
