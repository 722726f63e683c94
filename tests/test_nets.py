"""Tests of the avsm network modules (tiny inputs, CPU)."""

from __future__ import annotations

import pytest
import torch

from avsm.nets.affine_net import MOMENT_SCALE, AffineNet, moment_features
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


def _gaussian_blob(shape: tuple[int, int, int], centre: tuple[float, float, float], sd: float) -> torch.Tensor:
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for n in shape]
    g = torch.meshgrid(*axes, indexing="ij")
    r2 = sum((gi - ci) ** 2 for gi, ci in zip(g, centre))
    return torch.exp(-r2 / (2 * sd * sd))[None, None]


def test_moment_features_centroid_and_second_moments_of_a_blob() -> None:
    # a Gaussian well inside the cube: centroid = its centre, second moments = sd² I
    centre, sd = (0.4, 0.55, 0.6), 0.06
    for shape in [(41, 33, 57), (64, 64, 64)]:  # size-independent up to discretisation
        f = moment_features(_gaussian_blob(shape, centre, sd)).double()[0]
        assert f.shape == (9,)
        torch.testing.assert_close(f[:3], torch.tensor(centre, dtype=torch.float64) - 0.5, atol=1e-5, rtol=0)
        want = MOMENT_SCALE * torch.tensor([sd * sd] * 3 + [0.0] * 3, dtype=torch.float64)
        torch.testing.assert_close(f[3:], want, atol=2e-4, rtol=0)


def test_moment_features_follow_a_translation() -> None:
    shape = (48, 40, 36)
    a = moment_features(_gaussian_blob(shape, (0.45, 0.5, 0.5), 0.08))[0]
    b = moment_features(_gaussian_blob(shape, (0.55, 0.4, 0.52), 0.08))[0]
    torch.testing.assert_close((b - a)[:3], torch.tensor([0.1, -0.1, 0.02], dtype=a.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close((b - a)[3:], torch.zeros(6, dtype=a.dtype), atol=1e-4, rtol=0)


def test_moment_features_zero_channel_and_gap_only_head() -> None:
    z = moment_features(torch.zeros(1, 2, 8, 8, 8))
    assert torch.isfinite(z).all()
    legacy = AffineNet(base_channels=4, depth=3, moments=False)
    assert legacy.fc1.in_features == 4 * 4  # GAP features only
    A, b = legacy(torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16))
    assert torch.equal(A, torch.eye(3)[None]) and torch.equal(b, torch.zeros(1, 3))


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
