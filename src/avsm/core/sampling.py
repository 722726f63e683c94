"""Warping, composition and resampling of images and maps (unit-cube convention).

See :mod:`avsm.core.coords` for the convention.  All functions are batch-first,
differentiable where it makes sense, and device-agnostic.
"""

from __future__ import annotations

import math
import warnings
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


#: a grid_sample with fewer points runs as one call (splitting would cost more than it saves)
_SPLIT_MIN_POINTS = 1 << 16


def grid_sample_split(field: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear",
                      padding: str = "zeros") -> torch.Tensor:
    """``F.grid_sample(field, grid, align_corners=True)``, its points spread over torch's CPU threads.

    PyTorch's 3-D CPU kernel gives each batch item to one thread, so one image is sampled on
    one core.  Here the points of a single image are cut into ``torch.get_num_threads()``
    batch items of the same image (expanded, not copied): the same values, point for point,
    on all cores.  Other cases (GPU, batches, autograd, small grids) call ``grid_sample`` as is.

    Args:
        field: ``(1, C, d, h, w)``.
        grid: ``(1, D, H, W, 3)`` in ``grid_sample``'s convention.
        mode, padding: as ``grid_sample``'s ``mode`` and ``padding_mode``.

    Returns:
        ``(1, C, D, H, W)``.
    """
    T = torch.get_num_threads()
    n = grid.shape[1] * grid.shape[2] * grid.shape[3] if grid.dim() == 5 else 0
    if (field.device.type != "cpu" or field.dim() != 5 or field.shape[0] != 1 or grid.shape[0] != 1 or T < 2
            or n < _SPLIT_MIN_POINTS or (torch.is_grad_enabled() and (field.requires_grad or grid.requires_grad))):
        return F.grid_sample(field, grid, mode=mode, padding_mode=padding, align_corners=True)
    per = -(-n // T)
    g = grid.reshape(n, 3)
    if per * T != n:
        g = torch.cat([g, g.new_zeros(per * T - n, 3)])
    C = field.shape[1]
    out = F.grid_sample(field.expand(T, *field.shape[1:]), g.view(T, per, 1, 1, 3), mode=mode,
                        padding_mode=padding, align_corners=True)  # (T, C, per, 1, 1)
    out = out.view(T, C, per).transpose(0, 1).reshape(C, T * per)[:, :n]
    return out.reshape(1, C, *grid.shape[1:4])


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
            ``nearest``.  Only for single-channel integer label maps.  Computed from the
            8 voxels around each point (cost independent of the number of labels; the
            same result, voxel for voxel, as one interpolation per label on CPU: see
            :func:`_vote_labels`).
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
        return grid_sample_split(img.to(grid.dtype), grid, padding=padding)
    if mode == "nearest":
        # float64 sampling keeps integer label values exact up to 2**53
        out = grid_sample_split(image.to(torch.float64), grid.to(torch.float64), mode="nearest", padding=padding)
        return out.round().to(image.dtype) if not image.is_floating_point() else out.to(image.dtype)
    if mode == "label":
        return _warp_labels(image, grid.float(), padding, label_values)
    raise ValueError(f"unknown warp mode {mode!r}")


def _sorted_values(labels: torch.Tensor, label_values: Sequence[int] | None) -> list[int]:
    """The label values to vote among, ascending (found in ``labels`` unless given)."""
    if label_values is None:
        return [int(v) for v in torch.unique(labels).tolist()]
    return sorted({int(v) for v in label_values})


def _warp_labels(labels: torch.Tensor, grid: torch.Tensor, padding: Padding,
                 label_values: Sequence[int] | None = None) -> torch.Tensor:
    """``label`` warping of ``warp``: the arg-max of the per-label trilinear weights, from the 8 corners.

    Args:
        labels: ``(B, 1, d, h, w)`` label map (integer dtype).
        grid: ``(B, D, H, W, 3)`` ``grid_sample`` grid (float32).
        padding: ``zeros`` or ``border``.
        label_values: the values voted among (default: those in ``labels``).

    Returns:
        ``(B, 1, D, H, W)`` labels, dtype of ``labels``; the same, voxel for voxel, as
        :func:`_warp_labels_per_label` (see :func:`_vote_labels`).
    """
    if labels.shape[1] != 1:
        raise ValueError("label warping needs a single-channel label map")
    values = _sorted_values(labels, label_values)
    pos = _vote_labels(label_indices(labels, values), grid, padding, values)
    return positions_to_labels(pos, values, labels.dtype)


def _warp_labels_per_label(labels: torch.Tensor, grid: torch.Tensor, padding: Padding,
                           label_values: Sequence[int] | None = None) -> torch.Tensor:
    """The reference definition of ``label`` warping (one ``grid_sample`` per label; kept for tests).

    For each label ``v`` (ascending) its indicator is interpolated trilinearly (``w_v``); with
    ``zeros`` padding the weight of the corners outside the image is added to label 0's
    ``w_0`` (outside counts as background).  The output is the label of largest ``w_v``, the
    smallest such label on a tie (a later label must be strictly larger to win); with
    ``zeros`` padding and no label 0 among the values, a point where every ``w_v`` is 0 gets 0.
    Costs one pass per label: :func:`_warp_labels` gives the same result at the cost of one.
    """
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


# ---------------------------------------------------------------- label warping from the 8 corners
#
# Codes of the padded label-index volume (values >= 0 are positions in the sorted label values).
_OUTSIDE = -2  # outside the image (the 2-voxel frame around it)
_NOT_A_VALUE = -1  # inside, but its label is not among the values voted on
_MIXED = -3  # (uniform-cube table only) the 8 voxels of the cube differ

#: points per chunk of the vote (bounds its temporaries to about 60 bytes per point)
_VOTE_CHUNK = 1 << 20


def label_indices(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Each voxel's position among the sorted label ``values`` (-1 where its label is not one).

    Args:
        labels: ``(B, 1, d, h, w)`` label map (any integer or float dtype).
        values: distinct label values, ascending.

    Returns:
        ``(B, 1, d, h, w)`` int16 (fewer than 32 000 values) or int32 positions.
    """
    if not values:
        raise ValueError("label warping needs at least one label value")
    dt = torch.int16 if len(values) < 32000 else torch.int32
    dev = labels.device
    if labels.numel() and not labels.is_floating_point() and labels.dtype != torch.bool:
        lo, hi = int(labels.min()), int(labels.max())
        if hi - lo < 1 << 24:  # a look-up table over the range of the labels
            lut = torch.full((hi - lo + 1,), _NOT_A_VALUE, dtype=dt, device=dev)
            v = torch.tensor(values, dtype=torch.int64, device=dev)
            keep = (v >= lo) & (v <= hi)
            lut[v[keep] - lo] = torch.arange(len(values), dtype=dt, device=dev)[keep]
            return lut[labels.to(torch.int64) - lo]
    v = torch.tensor(values, dtype=labels.dtype if labels.is_floating_point() else torch.int64, device=dev)
    lab = labels.to(v.dtype).contiguous()
    pos = torch.searchsorted(v, lab).clamp_(max=len(values) - 1)
    return torch.where(v[pos] == lab, pos, _NOT_A_VALUE).to(dt)


def positions_to_labels(pos: torch.Tensor, values: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Label values of vote results: ``values[pos]``, 0 where ``pos`` is -1."""
    table = torch.tensor([0, *values], dtype=torch.int64, device=pos.device).to(dtype)
    return table[pos + 1]


def _corner_tables(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label-index volume framed by 2 voxels of ``_OUTSIDE``, and its uniform-cube table.

    Args:
        index: ``(b, 1, d, h, w)`` label positions (:func:`label_indices`).

    Returns:
        ``(P, U)``, both ``(b, d + 4, h + 4, w + 4)`` (index's dtype): ``P`` the framed volume;
        ``U[z, y, x]`` the common code of the 8 voxels ``P[z:z+2, y:y+2, x:x+2]`` when they are
        equal, else ``_MIXED`` (the last slice of each axis is ``_MIXED``).
    """
    b, _, d, h, w = index.shape
    P = torch.full((b, d + 4, h + 4, w + 4), _OUTSIDE, dtype=index.dtype, device=index.device)
    P[:, 2:-2, 2:-2, 2:-2] = index[:, 0]
    c = P[:, :-1, :-1, :-1]
    same = c == P[:, 1:, :-1, :-1]
    for dz, dy, dx in ((0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)):
        same &= c == P[:, dz:dz + d + 3, dy:dy + h + 3, dx:dx + w + 3]
    U = torch.full_like(P, _MIXED)
    U[:, :-1, :-1, :-1] = torch.where(same, c, torch.full((), _MIXED, dtype=c.dtype, device=c.device))
    return P, U


def _vote_labels(index: torch.Tensor, grid: torch.Tensor, padding: Padding, values: Sequence[int]) -> torch.Tensor:
    """Arg-max label vote of every ``grid`` point from its 8 neighbouring voxels.

    Equal, bit for bit, to :func:`_warp_labels_per_label` on the same ``grid`` (CPU, float32):
    ``grid_sample`` adds, per label, the in-image corner weights
    ``tnw, tne, tsw, tse, bnw, bne, bsw, bse`` (each a product of three 1-D weights) in that
    order, so here each corner's weights are computed with the same float operations and, per
    corner, the weights of the corners carrying its label are added in that order; adding
    the other labels' zeros changes nothing.  A label absent from the 8 corners has weight 0.
    Label 0 gets ``1 - (sum of the in-image weights)`` added with ``zeros`` padding.  The
    largest weight wins, the smallest label on a tie.  The few points where no label
    among the corners has a positive weight go through the reference's loop over all values
    (dense, on those points only).  Most points lie in a cube of 8 equal voxels, which one
    look-up of the uniform-cube table answers; only the others are voted.

    Args:
        index: ``(B or 1, 1, d, h, w)`` label positions (:func:`label_indices`).
        grid: ``(B, D, H, W, 3)`` ``grid_sample`` coordinates (``align_corners=True``).
        padding: ``zeros`` or ``border``.
        values: the sorted label values ``index`` refers to.

    Returns:
        ``(B, 1, D, H, W)`` int64 positions in ``values``; -1 for "no label" (label 0 of the
        output: ``zeros`` padding, 0 not among the values, no positive weight).
    """
    B = grid.shape[0]
    d, h, w = index.shape[2:]
    zero_pos = values.index(0) if padding == "zeros" and 0 in values else None
    P, U = _corner_tables(index)
    out = torch.empty((B, grid.shape[1] * grid.shape[2] * grid.shape[3]), dtype=torch.int64, device=grid.device)
    for b in range(B):
        k = b if P.shape[0] > 1 else 0
        Pb, Ub = P[k].reshape(-1), U[k].reshape(-1)
        g = grid[b].reshape(-1, 3)
        for s in range(0, g.shape[0], _VOTE_CHUNK):
            out[b, s:s + _VOTE_CHUNK] = _vote_chunk(g[s:s + _VOTE_CHUNK], Pb, Ub, (d, h, w), padding,
                                                    zero_pos, len(values))
    return out.view(B, 1, *grid.shape[1:4])


def _vote_chunk(g: torch.Tensor, P: torch.Tensor, U: torch.Tensor, dims: tuple[int, int, int],
                padding: Padding, zero_pos: int | None, n_values: int) -> torch.Tensor:
    """:func:`_vote_labels` for ``(n, 3)`` points ``g`` and one image's flat tables ``P``, ``U``."""
    d, h, w = dims
    Hp, Wp = h + 4, w + 4
    itype = torch.int32 if P.numel() < 2**31 else torch.int64
    coords = []
    for c, size in ((0, w), (1, h), (2, d)):
        # grid_sample's unnormalisation (align_corners=True), with the same float operations
        u = ((g[:, c] + 1) / 2) * (size - 1)
        if padding == "border":
            u = torch.nan_to_num(u, nan=float(size - 1)).clamp_(0, size - 1)  # as std::min/max treat NaN
        else:
            u = torch.nan_to_num(u, nan=-10.0)  # NaN reads nothing: outside
        coords.append(u)
    x, y, z = coords
    x0, y0, z0 = torch.floor(x), torch.floor(y), torch.floor(z)
    # flat position of corner (x0, y0, z0) in the framed volume (clamped into the frame: a point
    # further out reads 8 outside voxels, as grid_sample reads none)
    base = z0.clamp(-2, d).to(itype).add_(2).mul_(Hp)
    base += y0.clamp(-2, h).to(itype).add_(2)
    base *= Wp
    base += x0.clamp(-2, w).to(itype).add_(2)
    cube = U.index_select(0, base)
    res = cube.to(torch.int64)
    if padding == "zeros":
        outside = cube == _OUTSIDE  # all 8 corners outside: only label 0's added weight, 1
        res[outside] = -1 if zero_pos is None else zero_pos
        rest = ((cube == _MIXED) | (cube == _NOT_A_VALUE)).nonzero()[:, 0]
    else:
        rest = (cube < 0).nonzero()[:, 0]
    if rest.numel() == 0:
        return res
    offs = torch.tensor([0, 1, Wp, Wp + 1, Hp * Wp, Hp * Wp + 1, Hp * Wp + Wp, Hp * Wp + Wp + 1],
                        dtype=itype, device=g.device)
    L = P.index_select(0, (base[rest][None] + offs[:, None]).reshape(-1)).view(8, -1)
    x, y, z, x0, y0, z0 = x[rest], y[rest], z[rest], x0[rest], y0[rest], z0[rest]
    # grid_sample's corner weights: tnw = (x1 - x) * (y1 - y) * (z1 - z), ..., bse = (x - x0) * ...
    ax0, ay0, az0 = (x0 + 1) - x, (y0 + 1) - y, (z0 + 1) - z
    ax1, ay1, az1 = x - x0, y - y0, z - z0
    p00, p10, p01, p11 = ax0 * ay0, ax1 * ay0, ax0 * ay1, ax1 * ay1
    W = torch.stack([p00 * az0, p10 * az0, p01 * az0, p11 * az0, p00 * az1, p10 * az1, p01 * az1, p11 * az1])
    S = torch.zeros_like(W)
    for j in range(8):  # in grid_sample's order; W * 1 and + 0 are exact
        S += W[j] * (L == L[j])
    if zero_pos is not None:
        ones = torch.zeros_like(W[0])
        for j in range(8):
            ones += W[j] * (L[j] != _OUTSIDE)
        extra = 1.0 - ones  # the weight of the outside, counted as label 0
        S = torch.where(L == zero_pos, S + extra, S)
        # label 0 among the candidates even when no corner carries it (0 + extra == extra)
        S = torch.cat([S, extra[None]])
        L = torch.cat([L, torch.full_like(L[:1], zero_pos)])
    S = torch.where(L >= 0, S, torch.full((), -math.inf, dtype=S.dtype, device=S.device))
    best_w = S.amax(0)
    key = torch.where(S == best_w, L, torch.full((), torch.iinfo(L.dtype).max, dtype=L.dtype, device=L.device))
    res[rest] = key.amin(0).to(torch.int64)
    rare = ~(best_w > 0)
    if bool(rare.any()):
        res[rest[rare]] = _dense_vote(S[:, rare], L[:, rare], n_values, padding == "zeros" and zero_pos is None)
    return res


def _dense_vote(S: torch.Tensor, L: torch.Tensor, n_values: int, zero_if_none: bool) -> torch.Tensor:
    """The reference's loop over all label values, for points where no corner label weighs > 0.

    Args:
        S, L: ``(k, m)`` candidate weights and label positions (``L < 0``: none).
        n_values: number of label values (the others weigh 0).
        zero_if_none: return -1 where the best weight is not positive.

    Returns:
        ``(m,)`` int64 positions: the first (smallest) value of largest weight.
    """
    m = S.shape[1]
    dense = torch.zeros((m, n_values), dtype=S.dtype, device=S.device)
    rows = torch.arange(m, device=S.device)
    ok = L >= 0
    for k in range(S.shape[0]):  # a label's candidates: its weight is the largest of them
        r, c = rows[ok[k]], L[k][ok[k]].long()
        dense[r, c] = -math.inf
    for k in range(S.shape[0]):
        r, c = rows[ok[k]], L[k][ok[k]].long()
        dense[r, c] = torch.maximum(dense[r, c], S[k][ok[k]])
    best_w, best = dense.max(1)  # first maximal index: the smallest value, as the reference's strict ">"
    if zero_if_none:
        best = torch.where(best_w > 0, best, -1)
    return best


def warp_label_indices(index: torch.Tensor, phi: torch.Tensor, values: Sequence[int], *,
                       padding: Padding = "zeros", dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``warp(labels, phi, mode="label")`` given the labels' positions (:func:`label_indices`).

    For a sampler that warps one label map piece by piece: the positions are found once.

    Args:
        index: ``(B or 1, 1, d, h, w)`` from :func:`label_indices` ``(labels, values)``.
        phi: ``(B, 3, D, H, W)`` map into ``index``'s unit coordinates.
        values: the sorted label values.
        padding: ``zeros`` (outside counts as label 0) or ``border``.
        dtype: of the returned labels.

    Returns:
        ``(B, 1, D, H, W)`` labels.
    """
    _check_map(phi)
    grid = to_grid_sample(phi.to(torch.float32) if not phi.is_floating_point() else phi).float()
    return positions_to_labels(_vote_labels(index, grid, padding, list(values)), values, dtype)


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


AxisMap = tuple[tuple[int, int, int], tuple[float, float, float], tuple[float, float, float]]


def axis_aligned(M: torch.Tensor | Sequence[Sequence[float]], tol: float = 1e-9) -> AxisMap | None:
    """Whether a homogeneous unit-coordinate matrix only scales, shifts and permutes the axes.

    Args:
        M: ``(4, 4)`` (or ``(3, 4)``) matrix from output unit coordinates (channel order D, H, W)
            to input unit coordinates.
        tol: entries below ``tol`` times the largest of the linear part count as zero.

    Returns:
        ``(perm, scale, shift)`` with input coordinate ``a`` equal to
        ``scale[a] * output coordinate perm[a] + shift[a]``, or ``None`` when ``M`` mixes axes.
    """
    A = torch.as_tensor(M, dtype=torch.float64)[:3]
    lin = A[:, :3].abs()
    big = lin > tol * float(lin.max())
    if not (big.sum(0) == 1).all() or not (big.sum(1) == 1).all():
        return None
    perm = tuple(int(big[a].nonzero()[0, 0]) for a in range(3))
    scale = tuple(float(A[a, perm[a]]) for a in range(3))
    shift = tuple(float(A[a, 3]) for a in range(3))
    return perm, scale, shift  # type: ignore[return-value]


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)``; along the last axis by ``gather`` (index_select is 5-15x slower there)."""
    if dim != x.dim() - 1:
        return x.index_select(dim, index)
    shape = list(x.shape)
    shape[dim] = index.numel()
    return torch.gather(x, dim, index.view(*([1] * dim), -1).expand(shape))


def sample_axis_aligned(field: torch.Tensor, axes: AxisMap, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear sampling (``border`` padding) of ``field`` at the points of an axis-aligned affine map.

    The same values as ``warp(field, affine map, padding="border")`` (up to float rounding),
    computed separably: one 1-D linear interpolation per axis, so the cost is a few passes
    over the output instead of ``grid_sample``'s 8 scattered reads per point and channel.

    Args:
        field: ``(B, C, d, h, w)``, on the input grid (unit cube, ``align_corners=True``).
        axes: from :func:`axis_aligned` of the matrix output unit → input unit coordinates.
        shape: output spatial shape ``(D, H, W)``.

    Returns:
        ``(B, C, *shape)`` (``field``'s dtype).
    """
    perm, scale, shift = axes
    shape = tuple(int(s) for s in shape)
    out = field
    # shrinking axes first (a slab of few output slices cuts the work of the others)
    order = sorted(range(3), key=lambda a: shape[perm[a]] / field.shape[2 + a])
    for a in order:
        n, m = field.shape[2 + a], shape[perm[a]]
        t = torch.linspace(0.0, 1.0, m, dtype=torch.float64, device=field.device) if m > 1 else \
            torch.zeros(1, dtype=torch.float64, device=field.device)
        x = ((t * scale[a] + shift[a]) * (n - 1)).clamp_(0, n - 1)  # input index, border padding
        i0 = x.floor().clamp_(max=max(n - 2, 0)).long()
        frac = (x - i0).to(field.dtype)
        i1 = (i0 + 1).clamp_(max=n - 1)
        view = [1, 1, 1, 1, 1]
        view[2 + a] = m
        out = torch.lerp(_take(out, 2 + a, i0), _take(out, 2 + a, i1), frac.view(view))
    inv = [perm.index(k) for k in range(3)]  # output axis k is input axis inv[k]
    return out.permute(0, 1, 2 + inv[0], 2 + inv[1], 2 + inv[2]).contiguous()


def affine_sampling_grid(M: torch.Tensor | Sequence[Sequence[float]], shape: Sequence[int], *,
                         dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The ``grid_sample`` grid of an affine map, in one batched matrix product (``F.affine_grid``).

    Args:
        M: ``(4, 4)`` matrix from the output grid's unit coordinates to the input's (channel
            order D, H, W; an axis of length 1 sits at coordinate 0).
        shape: output spatial shape ``(D, H, W)``.
        dtype, device: of the grid.

    Returns:
        ``(1, D, H, W, 3)``: ``to_grid_sample`` of the affine map ``M`` on ``shape`` (up to rounding).
    """
    shape = tuple(int(s) for s in shape)
    A = torch.as_tensor(M, dtype=torch.float64)
    P = torch.eye(3, dtype=torch.float64).flip(0)  # (D, H, W) <-> grid_sample's (x, y, z)
    lin = P @ A[:3, :3] @ P
    t = lin.sum(1) + 2.0 * (P @ A[:3, 3]) - 1.0  # normalised coordinates: n = 2 u - 1 on both sides
    for col, n in enumerate(reversed(shape)):
        if n == 1:  # affine_grid puts a single voxel at 0, avsm at -1 (unit 0)
            t = t - lin[:, col]
    theta = torch.cat([lin, t[:, None]], 1)[None].to(dtype=dtype, device=device)
    with warnings.catch_warnings():  # its note on single-voxel axes (handled above)
        warnings.simplefilter("ignore", UserWarning)
        return F.affine_grid(theta, [1, 1, *shape], align_corners=True)


def sample_affine(field: torch.Tensor, M: torch.Tensor | Sequence[Sequence[float]], shape: Sequence[int]
                  ) -> torch.Tensor:
    """``warp(field, affine map M on shape, padding="border")``: separable when ``M`` keeps the axes.

    Args:
        field: ``(1, C, d, h, w)``.
        M: ``(4, 4)`` output unit → ``field``'s unit coordinates.
        shape: output spatial shape.

    Returns:
        ``(1, C, *shape)``, ``field``'s dtype.
    """
    axes = axis_aligned(M)
    if axes is not None:
        return sample_axis_aligned(field, axes, shape)
    grid = affine_sampling_grid(M, shape, dtype=field.dtype, device=field.device)
    return grid_sample_split(field, grid, padding="border")


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
