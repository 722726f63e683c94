"""Small 3-D convolution building blocks shared by the avsm networks.

All blocks take and return ``(B, C, D, H, W)`` tensors.  Convolutions are
3x3x3 with "same" padding (padding 1); a stride of 2 halves every even
spatial size exactly (``N -> N / 2``) and maps odd ``N`` to ``(N + 1) / 2``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Activation = Literal["relu", "leaky_relu", "none"]
Norm = Literal["none", "batch", "instance", "group"]

#: Negative slope of the decoder LeakyReLU (PyTorch's default, as in the authors' code).
LEAKY_SLOPE = 0.01


def make_activation(act: Activation) -> nn.Module:
    """Return the activation module named ``act`` (``"none"`` gives identity)."""
    if act == "relu":
        return nn.ReLU(inplace=False)
    if act == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=False)
    if act == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {act!r}; expected 'relu', 'leaky_relu' or 'none'")


def make_norm(norm: Norm, channels: int) -> nn.Module:
    """Return a 3-D normalisation layer for ``channels`` features (``"none"`` gives identity)."""
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        groups = 8 if channels % 8 == 0 else 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}; expected 'none', 'batch', 'instance' or 'group'")


class ConvBlock(nn.Module):
    """Conv3d 3x3x3 ("same" padding) -> optional norm -> activation.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        stride: 1 keeps the spatial size; 2 halves it (even sizes).
        norm: normalisation after the convolution (default none, as the authors).
        act: activation after the (normalised) convolution.
        bias: whether the convolution has a bias (default: only without norm).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        norm: Norm = "none",
        act: Activation = "relu",
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        use_bias = (norm == "none") if bias is None else bias
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=use_bias
        )
        self.norm = make_norm(norm, out_channels)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B, C_in, D, H, W)``.

        Returns:
            ``(B, C_out, D', H', W')`` with ``D' = ceil(D / stride)`` etc.
        """
        return self.act(self.norm(self.conv(x)))


class ResidualConv(nn.Module):
    """Residual link around one same-width :class:`ConvBlock`: ``y = block(x) + x``.

    The activation is applied inside the block, before the addition (as in the
    authors' momentum generator, ``d2_2 = conv(d2_1) + d2_1``).

    Args:
        channels: input and output channels ``C``.
        norm: normalisation inside the block.
        act: activation inside the block.
    """

    def __init__(self, channels: int, *, norm: Norm = "none", act: Activation = "relu") -> None:
        super().__init__()
        self.block = ConvBlock(channels, channels, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, C, D, H, W)``.
        """
        return self.block(x) + x


class DownStage(nn.Module):
    """Stride-2 :class:`ConvBlock` followed by ``n_res`` :class:`ResidualConv` blocks.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        n_res: number of residual convolutions after the downsampling conv.
        norm: normalisation in every block.
        act: activation in every block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        n_res: int = 1,
        norm: Norm = "none",
        act: Activation = "relu",
    ) -> None:
        super().__init__()
        self.down = ConvBlock(in_channels, out_channels, stride=2, norm=norm, act=act)
        self.res = nn.Sequential(
            *[ResidualConv(out_channels, norm=norm, act=act) for _ in range(n_res)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample by 2 and refine.

        Args:
            x: ``(B, C_in, D, H, W)``.

        Returns:
            ``(B, C_out, ceil(D/2), ceil(H/2), ceil(W/2))``.
        """
        return self.res(self.down(x))


class UpConv(nn.Module):
    """Transposed convolution (kernel 2, stride 2) that doubles the spatial size, then activation.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        act: activation after the transposed convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, *, act: Activation = "leaky_relu") -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample by 2.

        Args:
            x: ``(B, C_in, D, H, W)``.

        Returns:
            ``(B, C_out, 2D, 2H, 2W)``.
        """
        return self.act(self.conv(x))


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
