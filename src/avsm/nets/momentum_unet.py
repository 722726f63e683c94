"""Momentum generator of the vSVF network: a residual U-Net ending at half resolution.

Paper: "four levels, residual links, last decoder level removed".  Layout
(``b = base_channels``; widths ``b * (1, 2, 4, 8, 16)``; all convs 3x3x3
"same"; ReLU in the encoder, LeakyReLU(0.01) in the decoder; no norm):

Encoder
    =====  ==========================================================
    full   conv ``in -> b``
    1/2    conv ``b -> 2b`` (stride 2), residual conv ``2b``       (skip e1)
    1/4    conv ``2b -> 4b`` (stride 2), residual conv ``4b``      (skip e2)
    1/8    conv ``4b -> 8b`` (stride 2), residual conv ``8b``      (skip e3)
    1/16   conv ``8b -> 16b`` (stride 2)                          (bottleneck)
    =====  ==========================================================

Decoder
    =====  ==========================================================
    1/8    ConvT ``16b -> 8b``; cat e3; conv ``16b -> 4b``; residual conv ``4b``
    1/4    ConvT ``4b -> 4b``; cat e2; conv ``8b -> 2b``; residual conv ``2b``
    1/2    ConvT ``2b -> 2b``; cat e1; conv ``4b -> b`` (no act); conv ``b -> out`` (no act)
    =====  ==========================================================

There is no full-resolution decoder level, so the output momentum is at half
resolution.  Compared with the authors' ``MomentumGen_resid`` the deep levels
have one residual conv fewer each, which keeps the parameter count at about a
half (``b = 16``: ~2.8 M instead of ~5.9 M).  The last conv is initialised
with small normal weights (std ``final_init_std``) and zero bias, so the
initial momentum is close to zero while gradients still reach every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from avsm.nets.blocks import ConvBlock, DownStage, ResidualConv, UpConv

#: Spatial sizes must be divisible by this (four stride-2 stages).
DIVISOR = 16


class MomentumUNet(nn.Module):
    """Residual U-Net producing a half-resolution vector momentum.

    Args:
        in_channels: input channels (2: warped moving and fixed, concatenated).
        base_channels: width ``b`` of the full-resolution level.
        out_channels: output channels (3 momentum components, order D, H, W).
        final_init_std: standard deviation of the last conv's initial weights
            (its bias starts at zero).
    """

    def __init__(
        self,
        in_channels: int = 2,
        base_channels: int = 8,
        out_channels: int = 3,
        *,
        final_init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        if in_channels < 1 or base_channels < 1 or out_channels < 1:
            raise ValueError(
                "in_channels, base_channels and out_channels must be >= 1, got "
                f"{in_channels}, {base_channels}, {out_channels}"
            )
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.out_channels = out_channels
        b = base_channels

        # Encoder (ReLU).
        self.enc0 = ConvBlock(in_channels, b, act="relu")
        self.enc1 = DownStage(b, 2 * b, n_res=1, act="relu")
        self.enc2 = DownStage(2 * b, 4 * b, n_res=1, act="relu")
        self.enc3 = DownStage(4 * b, 8 * b, n_res=1, act="relu")
        self.bottleneck = ConvBlock(8 * b, 16 * b, stride=2, act="relu")

        # Decoder (LeakyReLU), back up to 1/2 resolution only.
        self.up3 = UpConv(16 * b, 8 * b, act="leaky_relu")
        self.dec3 = ConvBlock(16 * b, 4 * b, act="leaky_relu")
        self.dec3_res = ResidualConv(4 * b, act="leaky_relu")
        self.up2 = UpConv(4 * b, 4 * b, act="leaky_relu")
        self.dec2 = ConvBlock(8 * b, 2 * b, act="leaky_relu")
        self.dec2_res = ResidualConv(2 * b, act="leaky_relu")
        self.up1 = UpConv(2 * b, 2 * b, act="leaky_relu")
        self.dec1 = ConvBlock(4 * b, b, act="none")
        self.out_conv = nn.Conv3d(b, out_channels, kernel_size=3, padding=1)
        nn.init.normal_(self.out_conv.weight, mean=0.0, std=final_init_std)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the momentum.

        Args:
            x: ``(B, in_channels, D, H, W)`` with ``D, H, W`` divisible by 16.

        Returns:
            ``(B, out_channels, D/2, H/2, W/2)`` momentum.

        Raises:
            ValueError: if ``x`` is not 5-D, has the wrong channel count, or a
                spatial size is not divisible by 16.
        """
        if x.dim() != 5:
            raise ValueError(f"expected a 5-D input (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % DIVISOR != 0 or s == 0 for s in spatial):
            raise ValueError(
                f"MomentumUNet needs spatial sizes divisible by {DIVISOR} (four stride-2 levels); "
                f"got (D, H, W) = {spatial}. Pad or resample the images first."
            )
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        z = self.bottleneck(e3)

        d = self.dec3_res(self.dec3(torch.cat([self.up3(z), e3], dim=1)))
        d = self.dec2_res(self.dec2(torch.cat([self.up2(d), e2], dim=1)))
        d = self.dec1(torch.cat([self.up1(d), e1], dim=1))
        return self.out_conv(d)
