"""Tests of the AVSM models: multi-step affine, the joint network, persistence, the bundled model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avsm.core.coords import affine_map, compose_affine, identity_affine, identity_map, invert_affine
from avsm.core.jacobian import jacobian_determinant
from avsm.core.sampling import warp
from avsm.errors import AvsmError
from avsm.models.affine import MultiStepAffine, affine_steps_product
from avsm.models.avsm import AVSM, AVSMConfig, AVSMOutput
from avsm.models.pretrained import load_pretrained
from avsm.nets.affine_net import AffineNet

TINY = AVSMConfig(affine_base=4, affine_depth=3, unet_base=4, affine_steps_train=2, affine_steps_test=3,
                  vsvf_steps_train=1, vsvf_steps_test=2, time_steps=4)


def blob_pair(n: int = 32, shift: float = 0.06, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth synthetic 'brains' ``(1, 1, n, n, n)``: an ellipsoid with a few inner blobs, shifted."""
    g = torch.Generator().manual_seed(seed)
    x = identity_map((n, n, n))[0]

    def img(offset: torch.Tensor) -> torch.Tensor:
        c = 0.5 + offset.view(3, 1, 1, 1)
        r = (((x - c) / torch.tensor([0.32, 0.38, 0.30]).view(3, 1, 1, 1)) ** 2).sum(0)
        out = torch.sigmoid((1.0 - r) * 12.0) * 0.6
        for k in range(3):
            ck = c + torch.tensor([0.1 * (k - 1), 0.08 * (1 - k), 0.05]).view(3, 1, 1, 1)
            out = out + 0.4 * torch.exp(-(((x - ck) ** 2).sum(0)) / 0.004)
        return out.clamp(0, 1)[None, None]

    noise = 0.01 * torch.randn(3, generator=g)
    return img(torch.tensor([shift, -shift, 0.5 * shift]) + noise), img(torch.zeros(3))


class _ScriptedNet(torch.nn.Module):
    """Stands in for AffineNet: returns a fixed sequence of residual affines."""

    def __init__(self, seq: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.seq = seq
        self.calls = 0

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, b = self.seq[self.calls]
        self.calls += 1
        return A, b


def test_affine_head_identity_at_init() -> None:
    torch.manual_seed(0)
    mov, fix = blob_pair()
    msa = MultiStepAffine(AffineNet(1, 4, 3), steps_train=3, steps_test=5)
    out = msa(mov, fix)
    assert len(out.steps) == 3
    A_id, b_id = identity_affine(1)
    torch.testing.assert_close(out.A, A_id)
    torch.testing.assert_close(out.b, b_id)
    torch.testing.assert_close(out.warped, mov, atol=1e-5, rtol=0)
    msa.eval()
    assert len(msa(mov, fix).steps) == 5


def test_two_step_composition_is_product() -> None:
    A1 = torch.tensor([[[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.02]]])
    b1 = torch.tensor([[0.02, -0.01, 0.03]])
    A2 = torch.tensor([[[0.98, 0.0, -0.02], [0.01, 1.03, 0.0], [0.0, 0.02, 0.99]]])
    b2 = torch.tensor([[-0.01, 0.02, 0.0]])
    A0 = torch.tensor([[[1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.01]]])
    b0 = torch.tensor([[0.005, 0.0, -0.005]])
    mov, fix = blob_pair()
    msa = MultiStepAffine(_ScriptedNet([(A1, b1), (A2, b2)]))  # type: ignore[arg-type]
    out = msa(mov, fix, A0, b0, steps=2)
    # paper rule: A_t = Ã A_{t-1}, b_t = Ã b_{t-1} + b̃
    A_exp = A2 @ A1 @ A0
    b_exp = (A2 @ (A1 @ b0.unsqueeze(-1) + b1.unsqueeze(-1))).squeeze(-1) + b2
    torch.testing.assert_close(out.A, A_exp)
    torch.testing.assert_close(out.b, b_exp)
    A_h, b_h = affine_steps_product([(A0, b0), (A1, b1), (A2, b2)])
    torch.testing.assert_close(out.A, A_h)
    torch.testing.assert_close(out.b, b_h)
    # the final warp is ONE interpolation of the original image with the composed map
    torch.testing.assert_close(out.warped, warp(mov, affine_map(A_exp, b_exp, fix.shape[2:])))
    # the dense map of the composed affine equals the composition of the dense maps
    Ac, bc = compose_affine(A2, b2, A1, b1)
    pts = affine_map(A1, b1, (5, 6, 7)).reshape(1, 3, -1) - 0.5
    two = (A2 @ pts + 0.5 + b2.unsqueeze(-1)).reshape(1, 3, 5, 6, 7)
    torch.testing.assert_close(two, affine_map(Ac, bc, (5, 6, 7)), atol=1e-6, rtol=0)


def test_affine_loss_symmetric_terms() -> None:
    torch.manual_seed(0)
    mov, fix = blob_pair()
    msa = MultiStepAffine(AffineNet(1, 4, 3), steps_train=2)
    _, losses = msa.loss(mov, fix, epoch=0.0, symmetric=True)
    assert set(losses) >= {"total", "sim", "reg", "sym", "lambda_reg"}
    assert float(losses["sym"]) == pytest.approx(0.0, abs=1e-10)  # identity both ways at init
    assert float(losses["lambda_reg"]) == pytest.approx(8.0)
    losses["total"].backward()
    assert all(p.grad is not None for p in msa.net.fc_out.parameters())


def test_avsm_forward_shapes_and_inverse() -> None:
    torch.manual_seed(0)
    model = AVSM(TINY).eval()
    mov, fix = blob_pair()
    with torch.no_grad():
        out = model(mov, fix, vsvf_steps=2)
    assert isinstance(out, AVSMOutput)
    assert out.phi.shape == (1, 3, 32, 32, 32)
    assert len(out.velocities) == 2 and out.velocities[0].shape == (1, 3, 16, 16, 16)
    assert len(out.momenta) == 2 and out.warped.shape == mov.shape
    assert model.vsvf_for((32, 32, 32)) is model.vsvf_for([32, 32, 32])
    Ai, bi = invert_affine(out.A, out.b)
    inv = model.vsvf_for((32, 32, 32)).inverse(out.velocities, affine_map(Ai, bi, (32, 32, 32)))
    assert inv.shape == (1, 3, 32, 32, 32)
    # affine-only when vsvf_steps = 0
    with torch.no_grad():
        aff = model(mov, fix, vsvf_steps=0)
    torch.testing.assert_close(aff.phi, affine_map(aff.A, aff.b, (32, 32, 32)))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 1, 30, 32, 32), torch.rand(1, 1, 30, 32, 32), vsvf_steps=1)


def test_avsm_moving_on_other_grid() -> None:
    """The moving image may lie on its own grid (as api.register passes it)."""
    torch.manual_seed(0)
    model = AVSM(TINY).eval()
    mov, fix = blob_pair()
    mov_small = torch.nn.functional.interpolate(mov, size=(24, 28, 20), mode="trilinear", align_corners=True)
    with torch.no_grad():
        out = model(mov_small, fix, *identity_affine(1), affine_steps=2, vsvf_steps=1)
    assert out.phi.shape == (1, 3, 32, 32, 32)
    assert out.warped.shape == fix.shape


def test_training_loss_vsvf_terms() -> None:
    torch.manual_seed(0)
    model = AVSM(TINY)
    model.freeze_affine(True)
    model.train()
    assert not model.affine.training
    mov, fix = blob_pair()
    losses = model.training_loss(mov, fix, stage="vsvf", symmetric=True)
    assert set(losses) == {"total", "sim", "reg", "sym"}
    losses["total"].backward()
    assert model.momentum.out_conv.weight.grad is not None
    assert all(p.grad is None for p in model.affine.parameters())


def test_save_load_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AVSM(TINY)
    with torch.no_grad():  # make the outputs non-trivial
        model.momentum.out_conv.weight.normal_(0.0, 0.05)
        model.affine.net.fc_out.weight.normal_(0.0, 0.01)
    model.eval()
    mov, fix = blob_pair()
    with torch.no_grad():
        ref = model(mov, fix)
    path = tmp_path / "w.pt"
    torch.save(model.export_state(), path)
    loaded = load_pretrained(str(path))
    assert loaded.config == model.config
    with torch.no_grad():
        out = loaded(mov, fix)
    torch.testing.assert_close(out.phi, ref.phi, atol=0, rtol=0)
    torch.testing.assert_close(out.A, ref.A, atol=0, rtol=0)


def test_load_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(AvsmError, match="not found"):
        load_pretrained(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(AvsmError, match="not an avsm model"):
        load_pretrained(str(bad))


def test_config_roundtrip() -> None:
    d = TINY.to_dict()
    assert AVSMConfig.from_dict({**d, "unknown_future_key": 1}) == TINY


def test_affine_guard_keeps_the_least_dissimilar_step() -> None:
    from avsm.losses.lncc import MKLNCC

    mov, fix = blob_pair(shift=0.06)
    torch.manual_seed(0)
    for guard in (False, True):
        model = AVSM(AVSMConfig(**{**TINY.to_dict(), "sigmas": TINY.sigmas, "affine_guard": guard}))
        with torch.no_grad():  # a drifting affine head: every step adds the same large translation
            model.affine.net.fc_out.bias[9:] = torch.tensor([0.15, -0.1, 0.12])
        model.eval()
        with torch.no_grad():
            out = model(mov, fix, vsvf_steps=0, affine_steps=3)
        if not guard:
            assert float(out.b.abs().max()) > 0.2  # the drift is real without the guard
            continue
        # candidates: the initial (identity) affine and the three composed steps; the guard keeps the argmin
        sim = MKLNCC()
        A, b = identity_affine(1)
        cands = [(A, b)]
        for _ in range(3):
            A, b = compose_affine(torch.eye(3)[None], torch.tensor([[0.15, -0.1, 0.12]]), A, b)
            cands.append((A, b))
        scores = [float(sim(warp(mov, affine_map(a, t, tuple(fix.shape[2:]))), fix)) for a, t in cands]
        k = int(np.argmin(scores))
        assert model.last_affine_choice == [k]
        assert k == 0  # here the drift only makes things worse
        torch.testing.assert_close(out.b, cands[k][1], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.A, cands[k][0], atol=1e-6, rtol=0)


def test_checkpoint_from_before_the_moment_head_loads() -> None:
    # configs written before ``affine_moments`` existed describe the GAP-only head
    old = AVSM(AVSMConfig(**{**TINY.to_dict(), "sigmas": TINY.sigmas, "affine_moments": False}))
    state = old.export_state()
    del state["config"]["affine_moments"]
    loaded = AVSM.from_state(state)
    assert loaded.config.affine_moments is False
    assert AVSM(TINY).config.affine_moments is True  # new models use the moment head
    with pytest.raises(RuntimeError):  # and the two heads are not interchangeable
        AVSM(TINY).load_state_dict(state["state_dict"], strict=True)


# ---------------------------------------------------------------------- bundled model

def test_pretrained_registers_demo_pair() -> None:
    """The bundled model beats its own affine stage on the real demo pair, without folds."""
    from avsm.api import register
    from avsm.data import demo_paths
    from avsm.io.image import load_image
    from avsm.metrics.overlap import dice_per_label
    from avsm.models.pretrained import bundled_path

    try:
        bundled_path()
    except AvsmError:
        pytest.fail("the bundled pretrained model is missing")
    p = demo_paths()
    fixed, moving = load_image(p["fixed"]), load_image(p["moving"])
    ml = load_image(p["moving_labels"], label=True)
    fl = load_image(p["fixed_labels"], label=True)
    # from the header start, as the model was evaluated (auto init already aligns this pair better)
    res = register(fixed=fixed, moving=moving, method="net", init="header", progress=False)
    labels = list(range(1, 13))
    d_net = float(np.nanmean(list(dice_per_label(res.warp(ml).array, fl.array, labels).values())))
    d_aff = float(np.nanmean(list(dice_per_label(res.warp(ml, affine_only=True).array, fl.array,
                                                 labels).values())))
    assert res.folds() == 0
    assert math.isfinite(d_net)
    assert d_net > d_aff + DEMO_MARGIN, (d_net, d_aff)
    assert float(jacobian_determinant(res.phi.double()).min()) > 0


#: Required Dice gain of the full network over its affine stage on the demo pair.
DEMO_MARGIN = 0.01
