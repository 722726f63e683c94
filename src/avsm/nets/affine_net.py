"""Affine regression network (one step of the paper's multi-step affine network).

Design, following the authors' ``Affine_unet_im`` in spirit:

* a first 3x3x3 conv (``in_channels -> base``, ReLU) whose weights are
  **shared** between the two images, applied to each separately, then the two
  feature maps are concatenated (``2 * base`` channels);
* ``depth`` stride-2 stages (stride-2 conv + residual conv, ReLU, no norm);
* **global average pooling**, so the head does not depend on the image size
  (unlike the authors' flatten + fixed ``affine_fc_size``);
* optionally (``moments=True``, the default) **moment pooling** of the shared
  first-layer features of each image: for every channel ``k`` the feature
  map ``f_k >= 0`` (after ReLU) is read as a mass distribution over the unit
  cube and summarised by its centroid (3 values, unit coordinates, centred at
  0.5) and its central second moments (6 values, scaled by 10).  Global
  average pooling alone discards *where* the features are, which is exactly
  what a translation estimate needs (an earlier GAP-only head learned a fixed
  "where the brain sits in the box" offset and diverged on held-out pairs);
  the moments are size-independent and give the head the centroid and
  inertia differences between the two images directly;
* ``FC -> ReLU -> FC(12)``; the last FC is zero-initialised and its 12 outputs
  are read as a residual, ``A = I + out[:9].view(3, 3)`` (row-major, output
  coordinate ``i = sum_j A[i, j] x_j``) and ``b = out[9:]``, so the network is
  exactly the identity at initialisation.

The output ``(A, b)`` is a centred affine in unit coordinates (see
:mod:`avsm.core.coords`): ``T(x) = A (x - c) + c + b``.
"""

from __future__ import annotations

import torch
from torch import nn

from avsm.nets.blocks import ConvBlock, DownStage


#: Moment features per channel: centroid (3) + central second moments (6).
N_MOMENTS = 9
#: Scale of the second moments (a uniform mass on [0, 1] has variance 1/12).
MOMENT_SCALE = 10.0


def moment_features(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Centroid and central second moments of non-negative feature maps.

    Args:
        feat: ``(B, C, D, H, W)`` non-negative features on a grid spanning the
            unit cube (index ``i`` ↦ ``i / (N - 1)``, :mod:`avsm.core.coords`).
        eps: added to each channel's mass (an all-zero channel gives zeros).

    Returns:
        ``(B, C * 9)``: per channel, the centroid minus 0.5 (unit coordinates,
        axis order D, H, W) then ``MOMENT_SCALE`` times the second central
        moments ``(dd, hh, ww, dh, dw, hw)``.  Size-independent: the same mass
        distribution sampled on any grid gives (up to discretisation) the same values.
    """
    B, C = feat.shape[:2]
    dims = feat.shape[2:]
    f = feat.float().clamp_min(0).flatten(2)  # (B, C, N)
    mass = f.sum(-1, keepdim=True) + eps
    w = f / mass
    axes = [torch.linspace(0.0, 1.0, n, device=feat.device, dtype=torch.float32) if n > 1
            else torch.full((1,), 0.5, device=feat.device) for n in dims]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).flatten(1)  # (3, N)
    cen = torch.einsum("bcn,kn->bck", w, grid)  # (B, C, 3)
    second = torch.einsum("bcn,kn,ln->bckl", w, grid, grid) - cen[..., :, None] * cen[..., None, :]
    iu = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    sec = torch.stack([second[..., i, j] for i, j in iu], -1)
    return torch.cat([cen - 0.5, MOMENT_SCALE * sec], -1).reshape(B, C * N_MOMENTS).to(feat.dtype)


class AffineNet(nn.Module):
    """CNN mapping an image pair to a residual centred affine ``(A, b)``.

    Args:
        in_channels: channels of *each* input image (1 for a grey-level pair).
        base_channels: width of the shared first conv; the stages use
            ``2 * base`` channels for the first two and ``4 * base`` after.
        depth: number of stride-2 stages (total downsampling ``2**depth``).
            Any spatial size works; sizes ``>= 2**(depth - 1)`` keep every
            stage meaningful (``>= 16`` for the default ``depth = 5``).
        moments: add the moment-pooled features of both images to the head
            (``18 * base`` extra inputs); ``False`` is the GAP-only head.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 16, depth: int = 5, *,
                 moments: bool = True) -> None:
        super().__init__()
        if in_channels < 1 or base_channels < 1 or depth < 1:
            raise ValueError(
                "in_channels, base_channels and depth must be >= 1, got "
                f"{in_channels}, {base_channels}, {depth}"
            )
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.depth = depth
        self.moments = bool(moments)

        self.shared = ConvBlock(in_channels, base_channels, act="relu")
        stages: list[nn.Module] = []
        ch = 2 * base_channels
        for i in range(depth):
            out_ch = 2 * base_channels if i < 2 else 4 * base_channels
            stages.append(DownStage(ch, out_ch, n_res=1, act="relu"))
            ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        hidden = 2 * base_channels
        n_in = ch + (2 * N_MOMENTS * base_channels if self.moments else 0)
        if self.moments:
            hidden = 4 * base_channels
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = nn.ReLU(inplace=False)
        self.fc_out = nn.Linear(hidden, 12)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)
        self.register_buffer("_eye", torch.eye(3), persistent=False)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the residual affine that aligns ``moving`` to ``fixed``.

        Args:
            moving: ``(B, C, D, H, W)`` (current warped) moving image, ``C = in_channels``.
            fixed: ``(B, C, D, H, W)`` fixed image, same shape as ``moving``.

        Returns:
            ``(A, b)`` with ``A`` of shape ``(B, 3, 3)`` and ``b`` of shape
            ``(B, 3)``; exactly ``(I, 0)`` at initialisation.

        Raises:
            ValueError: if the inputs are not 5-D, differ in shape, or have the
                wrong number of channels.
        """
        if moving.dim() != 5 or fixed.dim() != 5:
            raise ValueError(
                f"expected 5-D inputs (B, C, D, H, W), got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving and fixed must have the same shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        if moving.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channel(s) per image, got {moving.shape[1]}")
        fm, ff = self.shared(moving), self.shared(fixed)
        feats = self.pool(self.stages(torch.cat([fm, ff], dim=1))).flatten(1)
        if self.moments:
            feats = torch.cat([feats, moment_features(fm), moment_features(ff)], dim=1)
        out = self.fc_out(self.act(self.fc1(feats)))
        eye: torch.Tensor = self._eye  # type: ignore[assignment]
        A = eye.to(out.dtype) + out[:, :9].reshape(-1, 3, 3)
        b = out[:, 9:]
        return A, b
