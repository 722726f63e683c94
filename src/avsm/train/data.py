"""Training data: preprocessed volumes on one common working grid, and random pairs of them.

A *prepared folder* (written by ``scripts/prepare_training_data.py``) holds
``manifest.json``::

    {"grid": {...}, "spacing": 3.2,
     "volumes": [{"name": "mni6", "subject": "mni6", "image": "mni6.nii.gz",
                  "labels": "mni6_labels.nii.gz" | null}, ...]}

All images are on the same working grid (intensities normalised to [0, 1]
exactly as :func:`avsm.api.to_working` does at inference), so any two of them
form a pair.  :class:`PairDataset` yields augmented pairs whose randomness
is a pure function of ``(seed, epoch, index)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avsm.errors import AvsmError
from avsm.io.image import load_image
from avsm.train.augment import AugmentConfig, augment_intensity, augment_volume


@dataclass
class VolumeRecord:
    """One prepared volume: ``image`` ``(1, 1, D, H, W)`` float32, optional integer ``labels``."""

    name: str
    subject: str
    image: torch.Tensor
    labels: torch.Tensor | None


def load_prepared(folder: str | Path) -> list[VolumeRecord]:
    """Read a prepared folder (see module doc).

    Raises:
        AvsmError: no manifest, a missing file, or volumes on different grids.
    """
    folder = Path(folder)
    man = folder / "manifest.json"
    if not man.is_file():
        raise AvsmError("no manifest.json: not a prepared training folder "
                        "(run scripts/prepare_training_data.py)", folder)
    meta = json.loads(man.read_text())
    out: list[VolumeRecord] = []
    shape: tuple[int, ...] | None = None
    for v in meta["volumes"]:
        img = load_image(folder / v["image"])
        arr = torch.from_numpy(np.ascontiguousarray(img.array, dtype=np.float32))[None, None]
        lab = None
        if v.get("labels"):
            lv = load_image(folder / v["labels"], label=True)
            lab = torch.from_numpy(np.ascontiguousarray(lv.array).astype(np.int64))[None, None]
        if shape is None:
            shape = tuple(arr.shape)
        elif tuple(arr.shape) != shape:
            raise AvsmError(f"volume {v['name']} has shape {tuple(arr.shape)}, expected {shape}", folder)
        out.append(VolumeRecord(v["name"], v.get("subject", v["name"]), arr, lab))
    if not out:
        raise AvsmError("the manifest lists no volumes", folder)
    return out


def all_pairs(n: int, *, same_subject: bool = True) -> list[tuple[int, int]]:
    """Ordered pairs ``(moving, fixed)`` of ``n`` volumes, with ``(i, i)`` when ``same_subject``."""
    return [(i, j) for i in range(n) for j in range(n) if same_subject or i != j]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed of one sample."""
    return int((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class PairDataset(Dataset):
    """Random augmented pairs.

    Item ``i`` of epoch ``e`` uses pair ``pairs[i % len(pairs)]`` and a generator
    seeded with :func:`sample_seed` ``(seed, e, i)``.

    Args:
        volumes: prepared volumes (same grid).
        length: items per epoch.
        pairs: ``(moving, fixed)`` indices; default :func:`all_pairs`.
        augment: random spatial + intensity augmentation (on by default); off
            gives the raw pair.
        augment_config: ranges.
        seed: base seed.

    Items are dicts ``{"moving": (1, D, H, W), "fixed": (1, D, H, W), "pair": (2,)}``
    plus ``moving_labels``/``fixed_labels`` when both volumes have labels.
    """

    def __init__(
        self,
        volumes: Sequence[VolumeRecord],
        length: int,
        *,
        pairs: Sequence[tuple[int, int]] | None = None,
        augment: bool = True,
        augment_config: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.volumes = list(volumes)
        self.length = int(length)
        self.pairs = list(pairs) if pairs is not None else all_pairs(len(self.volumes))
        self.augment = augment
        self.cfg = augment_config or AugmentConfig()
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes every item's randomness)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.pairs[index % len(self.pairs)]
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        vm, vf = self.volumes[i], self.volumes[j]
        with torch.no_grad():
            if self.augment:
                m, ml = augment_volume(vm.image, vm.labels, g, self.cfg)
                f, fl = augment_volume(vf.image, vf.labels, g, self.cfg)
            else:
                m, ml, f, fl = vm.image, vm.labels, vf.image, vf.labels
        item: dict[str, Any] = {"moving": m[0].float(), "fixed": f[0].float(),
                                "pair": torch.tensor([i, j])}
        if ml is not None and fl is not None and vm.subject == vf.subject:
            item["moving_labels"] = ml[0]
            item["fixed_labels"] = fl[0]
        return item


def validation_pairs(volumes: Sequence[VolumeRecord], per_volume: int = 1, *, seed: int = 12345,
                     augment_config: AugmentConfig | None = None) -> list[dict[str, Any]]:
    """Fixed same-subject validation pairs with labels (two independent augmentations each).

    Cross-subject pairs have no common label protocol here, so only volumes
    with labels contribute.  Returns items shaped like :class:`PairDataset`'s.
    """
    cfg = augment_config or AugmentConfig()
    out: list[dict[str, Any]] = []
    for k, v in enumerate(volumes):
        if v.labels is None:
            continue
        for r in range(per_volume):
            g = torch.Generator().manual_seed(sample_seed(seed, k, r))
            m, ml = augment_volume(v.image, v.labels, g, cfg)
            f, fl = augment_volume(v.image, v.labels, g, cfg)
            out.append({"moving": m[0], "fixed": f[0], "moving_labels": ml[0],  # type: ignore[index]
                        "fixed_labels": fl[0], "pair": torch.tensor([k, k]), "name": v.name})  # type: ignore[index]
    return out


__all__ = ["VolumeRecord", "load_prepared", "all_pairs", "PairDataset", "validation_pairs",
           "sample_seed", "augment_intensity"]
