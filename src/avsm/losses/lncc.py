"""Multi-kernel local normalised cross-correlation (mk-LNCC), as in the AVSM paper.

For two images ``I`` and ``J`` and a cubic window ``w`` of ``k³`` taps,

    lncc_w = cov_w(I, J)² / (var_w(I) · var_w(J) + ε)

computed with un-normalised box sums (ε = 1e-5).  The similarity *loss* is
``Σ_s weight_s · (1 − mean_w lncc_w)`` over the window scales ``s``.  Windows
are strided (about a quarter of their size) and dilated; they are cubes sized
from the smallest spatial dimension ``S`` of the image:

    S < 64          one window  S/2                weight 1             dilation 1
    64 <= S < 128   windows     S/4, S/2           weights 0.3, 0.7     dilation 2
    S >= 128        windows     S/16, S/8, S/4     weights 0.1, 0.3, 0.6 dilation 2

The loss is 0 for identical images (away from constant windows), lies in
[0, 1], and is invariant to ``a·I + b`` with ``a ≠ 0`` up to ε.

**Masks.**  ``MKLNCC.forward(warped, fixed, weight)`` accepts a voxel weight
``w`` in [0, 1] on the fixed grid (``(B, 1, D, H, W)``, typically the fixed mask
times the moving mask warped into the fixed grid).  Each window's statistics
are then weighted box sums ``Σw, ΣwI, ΣwJ, ΣwI², ΣwJ², ΣwIJ``,

    cov = ΣwIJ − ΣwI·ΣwJ / Σw,   var_I = ΣwI² − (ΣwI)² / Σw,   (same for J)

and the windows of a scale are averaged with weights ``Σw`` (windows with no
mask weight drop out).  With ``w ≡ 1`` this is the unmasked loss; voxels with
``w = 0`` influence neither the loss nor its gradient.

**Box sums.**  The default separable box sum is a strided, dilated
``conv3d``; :func:`box_sum_cumsum` computes the same sums from cumulative sums
(an integral image, per residue class for dilated windows), selectable with
``MKLNCC(box="cumsum")``.  Measured on CPU (2 threads, float32, paper windows,
forward + backward of the whole loss): 48×56×48 conv 393 ms vs cumsum 726 ms,
96×112×96 conv 561 ms vs cumsum 808 ms; losses agree to 3e-6.  The conv stays
the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
#: Σw of a masked window below which it counts as empty (a thousandth of one voxel's weight)
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class Window:
    """One mk-LNCC window scale: cube size ``k`` (taps per axis), weight, dilation, stride."""

    size: int
    weight: float
    dilation: int
    stride: int


def paper_windows(shape: tuple[int, ...]) -> list[Window]:
    """The paper's window set for a spatial ``shape``, chosen from its smallest dimension."""
    S = int(min(shape))
    if S >= 128:
        spec = [(S // 16, 0.1), (S // 8, 0.3), (S // 4, 0.6)]
        dil = 2
    elif S >= 64:
        spec = [(S // 4, 0.3), (S // 2, 0.7)]
        dil = 2
    else:
        spec = [(max(S // 2, 2), 1.0)]
        dil = 1
    out = []
    for k, w in spec:
        k = max(int(k), 2)
        # the dilated window must fit inside the image
        d = dil
        while d > 1 and (k - 1) * d + 1 > S:
            d -= 1
        out.append(Window(size=k, weight=w, dilation=d, stride=max((k + 1) // 4, 1)))
    return out


def _box_sum(x: torch.Tensor, win: Window) -> torch.Tensor:
    """Separable strided, dilated box sum over ``k³`` taps, valid padding.  ``x``: (N, 1, D, H, W)."""
    k, d, s = win.size, win.dilation, win.stride
    one = torch.ones(1, 1, 1, 1, 1, dtype=x.dtype, device=x.device)
    w0 = one.expand(1, 1, k, 1, 1)
    w1 = one.expand(1, 1, 1, k, 1)
    w2 = one.expand(1, 1, 1, 1, k)
    x = F.conv3d(x, w0, stride=(s, 1, 1), dilation=(d, 1, 1))
    x = F.conv3d(x, w1, stride=(1, s, 1), dilation=(1, d, 1))
    return F.conv3d(x, w2, stride=(1, 1, s), dilation=(1, 1, d))


def _axis_box_cumsum(x: torch.Tensor, dim: int, k: int, d: int, s: int) -> torch.Tensor:
    """Box sum of ``k`` taps ``d`` apart along ``dim``, output every ``s`` voxels (valid only).

    With ``C`` the cumulative sum inside each residue class mod ``d`` of ``x``
    padded in front by ``d`` zeros, the window starting at ``a`` sums to
    ``C[a + k·d] − C[a]``.
    """
    x = x.movedim(dim, -1)
    L = x.shape[-1]
    n_out = (L - ((k - 1) * d + 1)) // s + 1
    if n_out < 1:
        raise ValueError(f"window of {k} taps, dilation {d} does not fit in {L} voxels")
    tail = (-(L + d)) % d
    xp = F.pad(x, (d, tail))
    c = xp.unflatten(-1, (xp.shape[-1] // d, d)).cumsum(-2).flatten(-2)
    last = (n_out - 1) * s + 1
    out = c[..., k * d: k * d + last: s] - c[..., 0:last:s]
    return out.movedim(-1, dim)


def box_sum_cumsum(x: torch.Tensor, win: Window) -> torch.Tensor:
    """Same sums as the conv box sum, from cumulative sums (integral image), ``x``: (N, 1, D, H, W).

    Each axis costs one cumulative sum over the whole axis plus two strided
    reads, independent of the window size ``k`` (the conv costs ``k`` taps per
    output).  Rounding differs from the conv version (differences of running
    sums); see ``MKLNCC(box=...)``.
    """
    k, d, s = win.size, win.dilation, win.stride
    for dim in (2, 3, 4):
        x = _axis_box_cumsum(x, dim, k, d, s)
    return x


BoxSum = Callable[[torch.Tensor, Window], torch.Tensor]
_BOX_SUMS: dict[str, BoxSum] = {"conv": _box_sum, "cumsum": box_sum_cumsum}


def expand_weight(weight: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Check a voxel weight against an image ``ref`` ``(B, C, D, H, W)`` and broadcast it.

    Args:
        weight: ``(B, 1, D, H, W)`` (or ``(1, 1, D, H, W)``, shared by the batch),
            values in [0, 1] (not checked: that would force a device sync).
        ref: the image the weight applies to.

    Returns:
        the weight as ``ref``'s dtype and device, expanded to ``(B, C, D, H, W)``.
    """
    if weight.dim() != 5 or weight.shape[1] != 1 or weight.shape[2:] != ref.shape[2:] \
            or weight.shape[0] not in (1, ref.shape[0]):
        raise ValueError(
            f"weight must be (B, 1, D, H, W) = ({ref.shape[0]}, 1, {', '.join(map(str, ref.shape[2:]))}),"
            f" got {tuple(weight.shape)}"
        )
    return weight.to(dtype=ref.dtype, device=ref.device).expand(ref.shape)


def lncc_map(I: torch.Tensor, J: torch.Tensor, win: Window, box: BoxSum = _box_sum) -> torch.Tensor:
    """Squared local correlation for every window position.

    Args:
        I, J: ``(B, C, D, H, W)`` images (each channel treated separately).
        win: window scale.
        box: box-sum function (the conv one by default, or :func:`box_sum_cumsum`).

    Returns:
        ``(B*C, 1, d, h, w)`` values in [0, 1].
    """
    B, C = I.shape[:2]
    I = I.reshape(B * C, 1, *I.shape[2:])
    J = J.reshape(B * C, 1, *J.shape[2:])
    n = float(win.size ** 3)
    sI, sJ = box(I, win), box(J, win)
    sII, sJJ, sIJ = box(I * I, win), box(J * J, win), box(I * J, win)
    cross = sIJ - sI * sJ / n
    # variances cannot be negative; rounding of the box sums (cumulative sums) can make them so
    var_i = (sII - sI * sI / n).clamp_min(0.0)
    var_j = (sJJ - sJ * sJ / n).clamp_min(0.0)
    # in [0, 1] by Cauchy-Schwarz; the clamp keeps rounding (e.g. a variance clamped to 0) there
    return (cross * cross / (var_i * var_j + EPS)).clamp(0.0, 1.0)


def masked_lncc_map(
    I: torch.Tensor, J: torch.Tensor, w: torch.Tensor, win: Window, box: BoxSum = _box_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted squared local correlation and the weight of every window.

    Args:
        I, J: ``(B, C, D, H, W)`` images (each channel treated separately).
        w: ``(B, C, D, H, W)`` voxel weights in [0, 1] (see :func:`expand_weight`).
        win: window scale.
        box: box-sum function.

    Returns:
        ``(lncc, sw)``, both ``(B*C, 1, d, h, w)``: ``lncc`` in [0, 1] from the
        weighted window statistics (0 where a window has no weight) and ``sw`` = Σw
        over each window.
    """
    B, C = I.shape[:2]
    shape = (B * C, 1, *I.shape[2:])
    I, J, w = I.reshape(shape), J.reshape(shape), w.reshape(shape)
    wI, wJ = w * I, w * J
    # one box-sum call on the six stacked quantities
    stacked = torch.cat([w, wI, wJ, wI * I, wJ * J, wI * J], dim=0)
    sw, sI, sJ, sII, sJJ, sIJ = box(stacked, win).chunk(6, dim=0)
    # where Σw = 0 every weighted sum is 0 too; cumulative-sum box sums leave rounding residue
    # there (|Σw| ~ 1e-6), so windows with less than MIN_WEIGHT of a voxel's weight count as empty
    empty = sw <= MIN_WEIGHT
    sw = sw.masked_fill(empty, 0.0)
    inv = torch.where(empty, torch.zeros_like(sw), 1.0 / sw.clamp_min(MIN_WEIGHT))
    cross = sIJ - sI * sJ * inv
    var_i = (sII - sI * sI * inv).clamp_min(0.0)
    var_j = (sJJ - sJ * sJ * inv).clamp_min(0.0)
    lncc = (cross * cross / (var_i * var_j + EPS)).clamp(0.0, 1.0)
    return lncc.masked_fill(empty, 0.0), sw


class MKLNCC(nn.Module):
    """Multi-kernel LNCC loss (lower is better, 0 at perfect local correlation).

    Args:
        windows: window scales; ``None`` picks :func:`paper_windows` from each input's shape.
        reduction: ``mean`` over the batch, or ``none`` for a per-item ``(B,)`` loss.
        box: box-sum implementation, ``conv`` (default, strided dilated conv3d) or
            ``cumsum`` (:func:`box_sum_cumsum`, same sums to rounding).
    """

    def __init__(
        self, windows: list[Window] | None = None, reduction: str = "mean", box: str = "conv"
    ) -> None:
        super().__init__()
        self.windows = windows
        if reduction not in ("mean", "none"):
            raise ValueError("reduction must be 'mean' or 'none'")
        self.reduction = reduction
        if box not in _BOX_SUMS:
            raise ValueError(f"box must be one of {sorted(_BOX_SUMS)}")
        self.box = box

    def forward(
        self, warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss between ``warped`` and ``fixed``, both ``(B, C, D, H, W)``, computed in float32/64.

        ``weight``: optional ``(B, 1, D, H, W)`` voxel weight in [0, 1] on the fixed
        grid; windows are then weighted by their Σw (an empty mask gives the
        loss ``Σ_s weight_s``, i.e. no correlation).  Returns a scalar, or ``(B,)``
        with ``reduction="none"``.
        """
        if warped.shape != fixed.shape:
            raise ValueError(f"shapes differ: {tuple(warped.shape)} vs {tuple(fixed.shape)}")
        if not warped.is_floating_point() or warped.dtype in (torch.float16, torch.bfloat16):
            warped, fixed = warped.float(), fixed.float()
        windows = self.windows or paper_windows(tuple(warped.shape[2:]))
        box = _BOX_SUMS[self.box]
        B = warped.shape[0]
        loss = torch.zeros(B, dtype=warped.dtype, device=warped.device)
        if weight is None:
            for win in windows:
                lm = lncc_map(warped, fixed, win, box).reshape(B, -1)
                loss = loss + win.weight * (1.0 - lm.mean(dim=1))
        else:
            w = expand_weight(weight, warped)
            for win in windows:
                lm, sw = masked_lncc_map(warped, fixed, w, win, box)
                lm, sw = lm.reshape(B, -1), sw.reshape(B, -1)
                total = sw.sum(dim=1)
                mean = (sw * lm).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)
                loss = loss + win.weight * (1.0 - mean)
        return loss.mean() if self.reduction == "mean" else loss
