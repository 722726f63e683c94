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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


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


def lncc_map(I: torch.Tensor, J: torch.Tensor, win: Window) -> torch.Tensor:
    """Squared local correlation for every window position.

    Args:
        I, J: ``(B, C, D, H, W)`` images (each channel treated separately).
        win: window scale.

    Returns:
        ``(B*C, 1, d, h, w)`` values in [0, 1].
    """
    B, C = I.shape[:2]
    I = I.reshape(B * C, 1, *I.shape[2:])
    J = J.reshape(B * C, 1, *J.shape[2:])
    n = float(win.size ** 3)
    sI, sJ = _box_sum(I, win), _box_sum(J, win)
    sII, sJJ, sIJ = _box_sum(I * I, win), _box_sum(J * J, win), _box_sum(I * J, win)
    cross = sIJ - sI * sJ / n
    var_i = sII - sI * sI / n
    var_j = sJJ - sJ * sJ / n
    return cross * cross / (var_i * var_j + EPS)


class MKLNCC(nn.Module):
    """Multi-kernel LNCC loss (lower is better, 0 at perfect local correlation).

    Args:
        windows: window scales; ``None`` picks :func:`paper_windows` from each input's shape.
        reduction: ``mean`` over the batch, or ``none`` for a per-item ``(B,)`` loss.
    """

    def __init__(self, windows: list[Window] | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.windows = windows
        if reduction not in ("mean", "none"):
            raise ValueError("reduction must be 'mean' or 'none'")
        self.reduction = reduction

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Loss between ``warped`` and ``fixed``, both ``(B, C, D, H, W)``, computed in float32/64."""
        if warped.shape != fixed.shape:
            raise ValueError(f"shapes differ: {tuple(warped.shape)} vs {tuple(fixed.shape)}")
        if not warped.is_floating_point() or warped.dtype in (torch.float16, torch.bfloat16):
            warped, fixed = warped.float(), fixed.float()
        windows = self.windows or paper_windows(tuple(warped.shape[2:]))
        B = warped.shape[0]
        loss = torch.zeros(B, dtype=warped.dtype, device=warped.device)
        for win in windows:
            lm = lncc_map(warped, fixed, win).reshape(B, -1)
            loss = loss + win.weight * (1.0 - lm.mean(dim=1))
        return loss.mean() if self.reduction == "mean" else loss
