"""Tests of the avsm network modules (tiny inputs, CPU)."""

from __future__ import annotations

import pytest
import torch

from avsm.nets.affine_net import AffineNet
from avsm.nets.blocks import ConvBlock, DownStage, ResidualConv, UpConv, count_parameters
from avsm.nets.momentum_unet import MomentumUNet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- blocks


def test_blocks_shapes() -> None:
    x = torch.randn(1, 2, 8, 6, 4)
    assert ConvBlock(2, 5)(x).shape == (1, 5, 8, 6, 4)
    assert ConvBlock(2, 5, stride=2, norm="instance", act="leaky_relu")(x).shape == (1, 5, 4, 3, 2)
    assert ResidualConv(2)(x).shape == x.shape
    assert DownStage(2, 4, n_res=2)(x).shape == (1, 4, 4, 3, 2)
    assert UpConv(2, 3)(x).shape == (1, 3, 16, 12, 8)
    with pytest.raises(ValueError):
        ConvBlock(2, 2, act="tanh")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- AffineNet


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 32, 64)])
def test_affine_net_identity_at_init_any_size(shape: tuple[int, int, int]) -> None:
    net = AffineNet()
    moving = torch.randn(2, 1, *shape)
    fixed = torch.randn(2, 1, *shape)
    A, b = net(moving, fixed)
    assert A.shape == (2, 3, 3) and b.shape == (2, 3)
    assert torch.equal(A, torch.eye(3).expand(2, 3, 3))
    assert torch.equal(b, torch.zeros(2, 3))


def test_affine_net_smallest_size() -> None:
    net = AffineNet(base_channels=4)
    A, b = net(torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16))
    assert A.shape == (1, 3, 3) and b.shape == (1, 3)


def test_affine_net_gradients_flow() -> None:
    net = AffineNet(base_channels=4, depth=3)
    moving = torch.randn(1, 1, 16, 16, 16)
    fixed = torch.randn(1, 1, 16, 16, 16)
    A_target = torch.tensor([[[1.1, 0.05, 0.0], [0.0, 0.9, 0.0], [0.02, 0.0, 1.0]]])
    b_target = torch.tensor([[0.1, -0.05, 0.02]])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss_fn() -> torch.Tensor:
        A, b = net(moving, fixed)
        return ((A - A_target) ** 2).sum() + ((b - b_target) ** 2).sum()

    loss_fn().backward()
    last = net.fc_out.weight.grad
    assert last is not None and last.abs().sum() > 0
    assert net.fc_out.bias.grad is not None and net.fc_out.bias.grad.abs().sum() > 0
    # Zero last layer: nothing reaches the first conv on the first backward.
    first = net.shared.conv.weight.grad
    assert first is None or torch.count_nonzero(first) == 0

    opt.step()
    opt.zero_grad()
    loss_fn().backward()
    first = net.shared.conv.weight.grad
    assert first is not None and first.abs().sum() > 0


def test_affine_net_input_checks() -> None:
    net = AffineNet(base_channels=4, depth=2)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 8))
    with pytest.raises(ValueError):
        net(torch.randn(1, 2, 16, 16, 16), torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError):
        net(torch.randn(1, 16, 16, 16), torch.randn(1, 16, 16, 16))


# --------------------------------------------------------------------------- MomentumUNet


def test_momentum_unet_half_resolution_output() -> None:
    net = MomentumUNet()
    m = net(torch.randn(1, 2, 32, 48, 64))
    assert m.shape == (1, 3, 16, 24, 32)
    # Small last-layer init: initial momentum near zero but not identically zero.
    assert 0 < m.abs().max() < 0.1


@pytest.mark.parametrize("shape", [(40, 40, 40), (32, 32, 40), (8, 16, 16)])
def test_momentum_unet_rejects_non_multiple_of_16(shape: tuple[int, int, int]) -> None:
    net = MomentumUNet(base_channels=2)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 2, *shape))


def test_momentum_unet_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError):
        MomentumUNet(base_channels=2)(torch.randn(1, 3, 16, 16, 16))


def test_momentum_unet_param_counts() -> None:
    n8 = count_parameters(MomentumUNet(base_channels=8))
    n16 = count_parameters(MomentumUNet(base_channels=16))
    assert n8 < 800_000
    assert n16 < 3_000_000
    assert n8 < n16


def test_momentum_unet_gradients_reach_first_conv() -> None:
    net = MomentumUNet(base_channels=4)
    x = torch.randn(1, 2, 16, 16, 16)
    net(x).square().sum().backward()
    g = net.enc0.conv.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_momentum_unet_deterministic_in_eval() -> None:
    net = MomentumUNet(base_channels=4).eval()
    x = torch.randn(1, 2, 32, 16, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
