"""Warping, composition and resampling of images and maps (unit-cube convention).

See :mod:`avsm.core.coords` for the convention.  All functions are batch-first,
differentiable where it makes sense, and device-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from avsm.core.coords import identity_map, to_grid_sample

WarpMode = Literal["linear", "nearest", "label"]
Padding = Literal["zeros", "border"]


def _check_map(phi: torch.Tensor) -> None:
    if phi.dim() != 5 or phi.shape[1] != 3:
        raise ValueError(f"map must have shape (B, 3, D, H, W), got {tuple(phi.shape)}")


def warp(
    image: torch.Tensor,
    phi: torch.Tensor,
    *,
    mode: WarpMode = "linear",
    padding: Padding = "zeros",
    label_values: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pull ``image`` back through ``phi``: ``out(x) = image(phi(x))``.

    Args:
        image: ``(B, C, d, h, w)`` on the grid that ``phi``'s values refer to.
        phi: ``(B, 3, D, H, W)`` map, values in ``image``'s unit coordinates.
        mode: ``linear`` (trilinear), ``nearest``, or ``label``.  ``label``
            interpolates each label's indicator trilinearly and takes the
            arg-max (ANTs' "GenericLabel" idea): it never invents a label
            value, keeps the input dtype and gives smoother boundaries than
            ``nearest``.  Only for single-channel integer label maps.
        padding: value outside the image: ``zeros`` or the ``border`` voxel.
        label_values: for ``label``, the label values present (default: found in ``image``;
            give them when warping one label map in several pieces).

    Returns:
        ``(B, C, D, H, W)``; same dtype as ``image`` for ``nearest``/``label``.
    """
    _check_map(phi)
    if image.dim() != 5:
        raise ValueError(f"image must have shape (B, C, D, H, W), got {tuple(image.shape)}")
    if image.shape[0] != phi.shape[0]:
        if image.shape[0] == 1:
            image = image.expand(phi.shape[0], *image.shape[1:])
        elif phi.shape[0] == 1:
            phi = phi.expand(image.shape[0], *phi.shape[1:])
        else:
            raise ValueError("image and map batch sizes differ")
    grid = to_grid_sample(phi.to(torch.float32) if not phi.is_floating_point() else phi)
    if mode == "linear":
        img = image if image.is_floating_point() else image.to(grid.dtype)
        return F.grid_sample(img.to(grid.dtype), grid, mode="bilinear", padding_mode=padding,
                             align_corners=True)
    if mode == "nearest":
        # float64 sampling keeps integer label values exact up to 2**53
        out = F.grid_sample(image.to(torch.float64), grid.to(torch.float64), mode="nearest",
                            padding_mode=padding, align_corners=True)
        return out.round().to(image.dtype) if not image.is_floating_point() else out.to(image.dtype)
    if mode == "label":
        return _warp_labels(image, grid.float(), padding, label_values)
    raise ValueError(f"unknown warp mode {mode!r}")


def _warp_labels(labels: torch.Tensor, grid: torch.Tensor, padding: Padding,
                 label_values: Sequence[int] | None = None) -> torch.Tensor:
    if labels.shape[1] != 1:
        raise ValueError("label warping needs a single-channel label map")
    values = torch.unique(labels) if label_values is None else torch.as_tensor(sorted(label_values))
    best = None
    best_w = None
    for v in values.tolist():
        ind = (labels == v).to(grid.dtype)
        w = F.grid_sample(ind, grid, mode="bilinear", padding_mode=padding, align_corners=True)
        if padding == "zeros" and v == 0:
            # outside the field of view counts as background
            w = w + (1.0 - F.grid_sample(torch.ones_like(ind), grid, mode="bilinear",
                                         padding_mode="zeros", align_corners=True))
        val = torch.full_like(w, float(v))
        if best is None:
            best, best_w = val, w
        else:
            better = w > best_w
            best = torch.where(better, val, best)
            best_w = torch.where(better, w, best_w)
    assert best is not None
    if padding == "zeros" and 0 not in values.tolist():
        best = torch.where(best_w > 0, best, torch.zeros_like(best))
    return best.round().to(labels.dtype)


def warp_masked(
    moving: torch.Tensor, moving_weight: torch.Tensor | None, phi: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp ``moving`` (and its mask, in the same interpolation) by ``phi``; combine with the fixed mask.

    Returns:
        ``(warped, weight)``: ``(1, 1, D, H, W)`` warped image and the similarity weight
        (fixed mask × warped moving mask), or ``None`` without masks.
    """
    if moving_weight is None:
        return warp(moving, phi), weight
    both = warp(torch.cat([moving, moving_weight], 1), phi)
    wm = both[:, 1:]
    return both[:, :1], (wm if weight is None else weight * wm)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Composition ``outer ∘ inner``: ``x -> outer(inner(x))``.

    ``outer``'s *displacement* is interpolated at ``inner(x)`` with border
    extrapolation, then added to ``inner(x)``.  This is exact for affine
    ``outer`` wherever ``inner(x)`` stays inside ``outer``'s grid, and degrades
    gracefully (constant displacement) outside it.

    Args:
        outer: ``(B, 3, d, h, w)`` map whose grid is the space ``inner`` points into.
        inner: ``(B, 3, D, H, W)`` map.

    Returns:
        ``(B, 3, D, H, W)`` map.
    """
    _check_map(outer)
    _check_map(inner)
    return compose_displacement(map_displacement(outer), inner)


def map_displacement(phi: torch.Tensor) -> torch.Tensor:
    """``phi - id`` on ``phi``'s own grid: what :func:`compose` interpolates (cache it to compose often)."""
    return phi - identity_map(phi.shape[2:], dtype=phi.dtype, device=phi.device)


def compose_displacement(disp: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``outer ∘ inner`` given ``disp = map_displacement(outer)`` (see :func:`compose`)."""
    return warp(disp, inner, mode="linear", padding="border") + inner


def resample_map(phi: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling of a map to another grid over the same unit cube.

    Affine maps stay exactly affine (trilinear interpolation reproduces linear
    functions and ``align_corners=True`` keeps the cube's corners fixed).

    Args:
        phi: ``(B, 3, D, H, W)``.
        shape: target spatial shape.
    """
    _check_map(phi)
    shape = tuple(int(s) for s in shape)
    if tuple(phi.shape[2:]) == shape:
        return phi
    return F.interpolate(phi, size=shape, mode="trilinear", align_corners=True)


def resample_image(image: torch.Tensor, shape: Sequence[int], *, antialias: bool = True) -> torch.Tensor:
    """Resample an image ``(B, C, D, H, W)`` to ``shape`` over the same unit cube.

    With ``antialias`` and downsampling, the image is first blurred with a
    Gaussian of sigma ``0.5 * factor`` voxels per axis (factor = old/new spacing
    ratio in voxels), which avoids aliasing in the multi-scale pyramid.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    if antialias:
        factors = [(n_old - 1) / max(n_new - 1, 1) for n_old, n_new in zip(image.shape[2:], shape)]
        if any(f > 1.0 for f in factors):
            image = gaussian_blur(image, [0.5 * f if f > 1.0 else 0.0 for f in factors])
    return F.interpolate(image, size=shape, mode="trilinear", align_corners=True)


class Pyramid:
    """An image and its anti-aliased resamplings, each computed once (shared by the pyramid stages).

    Args:
        image: ``(B, C, D, H, W)`` tensor.
    """

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image
        self._levels: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def shape(self) -> torch.Size:
        return self.image.shape

    def at(self, shape: Sequence[int]) -> torch.Tensor:
        """The image resampled to spatial ``shape`` (see :func:`resample_image`)."""
        key = tuple(int(s) for s in shape)
        if key not in self._levels:
            self._levels[key] = resample_image(self.image, key)
        return self._levels[key]


def level(image: torch.Tensor | Pyramid | None, shape: Sequence[int]) -> torch.Tensor | None:
    """``image`` at spatial ``shape``: from a :class:`Pyramid`'s cache, or resampled now."""
    if image is None:
        return None
    if isinstance(image, Pyramid):
        return image.at(shape)
    return resample_image(image, shape)


def gaussian_blur(image: torch.Tensor, sigmas_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur, sigma per axis in voxels (0 skips an axis), replicate padding."""
    out = image
    C = image.shape[1]
    for axis, s in enumerate(sigmas_vox):
        if s <= 0:
            continue
        r = max(int(round(3 * s)), 1)
        x = torch.arange(-r, r + 1, dtype=image.dtype, device=image.device)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        weight = k.reshape(shape).expand(C, 1, *shape[2:]).contiguous()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=C)
    return out
