"""AVSM: the joint multi-step affine + vSVF registration network.

Forward pass (all maps pull-back, unit coordinates, see :mod:`avsm.core.coords`):

1. the multi-step affine network (:class:`avsm.models.affine.MultiStepAffine`)
   turns the initial affine ``(A0, b0)`` (e.g. the physical identity between
   the working grids) into ``(A, b)``; in stage 2 it is frozen and runs with
   its test-time step count under ``no_grad``;
2. ``T`` vSVF steps, starting from ``Φ_0`` = the affine map on the fixed grid.
   Step ``k``: ``m_k = U(cat(I_m ∘ Φ_{k-1}, I_f))`` (momentum at half
   resolution, :class:`avsm.nets.momentum_unet.MomentumUNet`), then
   ``Φ_k = Φ_{k-1} ∘ exp(−K ⋆ m_k)`` (:class:`avsm.models.vsvf.VSVF`).  The
   moving image is always interpolated once, from the original, with the
   composed map.

Loss (stage 2, :meth:`AVSM.training_loss`), summed over the vSVF steps and
averaged over the two directions of the symmetric pair::

    Σ_k  mkLNCC(I_m ∘ Φ_k, I_f) + λ_vr ⟨m_k, v_k⟩ + λ_vs · N_vox · IC(Φ_k^{st}, Φ_k^{ts})

``IC`` is :func:`avsm.losses.consistency.map_inverse_consistency` (mean over
voxels of ``‖Φ_st ∘ Φ_ts − id‖²``); multiplying by the voxel count makes
``λ_vs`` act on the voxel *sum*, the paper's scale (λ_vs = 1e-4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from avsm.core.coords import affine_map, identity_affine, invert_affine
from avsm.core.sampling import warp
from avsm.core.smoothing import DEFAULT_SIGMAS
from avsm.losses.consistency import map_inverse_consistency
from avsm.losses.dice import warped_dice_loss
from avsm.losses.distill import map_distance_vox
from avsm.losses.lncc import MKLNCC
from avsm.models.affine import MultiStepAffine, _autocast
from avsm.models.domain import DomainReference
from avsm.models.vsvf import VSVF
from avsm.nets.affine_net import AffineNet
from avsm.nets.momentum_unet import DIVISOR, MomentumUNet


@dataclass
class AVSMConfig:
    """Hyper-parameters of an AVSM model (stored with every checkpoint).

    Attributes:
        working_spacing: working-grid spacing in mm used by :func:`avsm.api.register`.
        affine_base: base channels of the affine CNN; ``affine_depth`` its stride-2 stages.
        affine_moments: moment-pooling features in the affine head
            (:func:`avsm.nets.affine_net.moment_features`); configs saved before
            this option existed load as ``False`` (:meth:`AVSM.from_state`).
        unet_base: base channels of the momentum U-Net.
        affine_steps_train, affine_steps_test: multi-step affine counts.
        vsvf_steps_train, vsvf_steps_test: vSVF step counts.
        lambda_ar_C, lambda_ar_K: decaying affine regulariser ``C K / (K + e^{epoch/K})``.
        lambda_ar_min: floor of that weight.
        lambda_as: affine symmetry (inverse-consistency) weight.
        lambda_vr: vSVF regulariser weight on ``⟨m, v⟩``.
        lambda_vs: vSVF inverse-consistency weight (on the voxel sum, see module doc).
        sigmas: multi-Gaussian σ (unit domain); ``sigma_weights`` ``None`` = ∝ σ.
        time_steps: RK4 steps over unit time.
        integrator: ``rk4`` or ``euler``.
        amp: bf16 autocast for the CNNs on CUDA.
        affine_guard: at inference (``eval()`` mode), keep the affine step
            (0 = the initial affine) with the lowest mk-LNCC dissimilarity instead
            of the last one.  Unsupervised (no labels), a few warps at the working
            size; it stops an affine network that drifts on images unlike its
            training data from making the alignment worse than where it started.
    """

    working_spacing: float = 3.2
    affine_base: int = 8
    affine_depth: int = 5
    affine_moments: bool = True
    unet_base: int = 8
    affine_steps_train: int = 3
    affine_steps_test: int = 7
    vsvf_steps_train: int = 2
    vsvf_steps_test: int = 2
    lambda_ar_C: float = 10.0
    lambda_ar_K: float = 4.0
    lambda_ar_min: float = 1e-3
    lambda_as: float = 10.0
    lambda_vr: float = 10.0
    lambda_vs: float = 1e-4
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    sigma_weights: tuple[float, ...] | None = None
    time_steps: int = 10
    integrator: str = "rk4"
    amp: bool = True
    affine_guard: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["sigmas"] = list(self.sigmas)
        d["sigma_weights"] = list(self.sigma_weights) if self.sigma_weights is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AVSMConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "sigmas" in kw:
            kw["sigmas"] = tuple(float(s) for s in kw["sigmas"])
        if kw.get("sigma_weights") is not None:
            kw["sigma_weights"] = tuple(float(s) for s in kw["sigma_weights"])
        return cls(**kw)


def _he_init(module: nn.Module, keep: tuple[nn.Module, ...] = ()) -> None:
    """He (fan-in, ReLU) initialisation of every conv/linear layer except ``keep``, zero biases.

    The networks have no normalisation layers; with PyTorch's default init the
    activations shrink by about 0.4 per layer, so after the affine CNN's eleven
    convolutions the pooled features are ~1e-2 and the head learns an almost
    input-independent (constant) affine.  He init keeps the activation scale
    roughly constant.  The layers in ``keep`` (the zero-initialised affine head,
    the momentum output conv, zeroed by the caller) keep their own init.
    """
    kept = {id(m) for m in keep}
    for m in module.modules():
        if id(m) in kept:
            continue
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class AVSMOutput:
    """Output of :meth:`AVSM.forward`.

    Attributes:
        A, b: ``(B, 3, 3)``, ``(B, 3)`` affine stage result (fixed unit → moving unit).
        phi: ``(B, 3, D, H, W)`` final map on the fixed grid (moving unit coordinates).
        velocities: per vSVF step, ``(B, 3, d, h, w)`` low-resolution velocity.
        momenta: per vSVF step, ``(B, 3, d, h, w)`` momentum.
        warped: ``(B, C, D, H, W)`` moving image warped with ``phi``.
        losses: named scalar loss terms (empty unless requested).
        maps: per vSVF step, the ``(B, 3, D, H, W)`` map after that step.
        energies: per vSVF step, ``(B,)`` ``⟨m, v⟩``.
    """

    A: torch.Tensor
    b: torch.Tensor
    phi: torch.Tensor
    velocities: list[torch.Tensor]
    momenta: list[torch.Tensor]
    warped: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: list[torch.Tensor] = field(default_factory=list)
    energies: list[torch.Tensor] = field(default_factory=list)


class AVSM(nn.Module):
    """Multi-step affine network followed by a multi-step vSVF network.

    Args:
        config: hyper-parameters (default :class:`AVSMConfig`).

    Attributes:
        affine: :class:`MultiStepAffine`.
        momentum: :class:`MomentumUNet` (input ``cat(warped, fixed)``, output half-res momentum).
        affine_frozen: stage 2 flag: the affine part runs in eval mode under ``no_grad``.
        domain: what the training images looked like (:mod:`avsm.models.domain`), from a
            weights file's ``meta["domain"]``; ``None`` when the file has none.
    """

    def __init__(self, config: AVSMConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AVSMConfig()
        c = self.config
        self.affine = MultiStepAffine(AffineNet(1, c.affine_base, c.affine_depth, moments=c.affine_moments),
                                      c.affine_steps_train, c.affine_steps_test, amp=c.amp)
        self.momentum = MomentumUNet(2, c.unet_base, 3)
        _he_init(self.affine.net, keep=(self.affine.net.fc_out,))
        _he_init(self.momentum, keep=(self.momentum.out_conv,))
        # zero momentum at initialisation: the untrained network returns the affine result
        # exactly; the last conv still gets gradients (its inputs are non-zero)
        nn.init.zeros_(self.momentum.out_conv.weight)
        self.affine_frozen = False
        self._vsvf_cache: dict[tuple[int, int, int], VSVF] = {}
        self._sim = MKLNCC()
        self.last_affine_choice: list[int] = []  # set by the inference-time affine guard
        self.domain: DomainReference | None = None  # not a parameter: not in the state dict
        # epochs trained so far per stage, over every run (``--init-from`` included): the clock of
        # the decaying affine regulariser, so a fine-tune continues its schedule instead of restarting it
        self.trained_epochs: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers

    def freeze_affine(self, frozen: bool = True) -> None:
        """Freeze (stage 2) or unfreeze the affine network's parameters."""
        self.affine_frozen = frozen
        for p in self.affine.parameters():
            p.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> AVSM:
        """Like :meth:`nn.Module.train`, but a frozen affine part stays in eval mode."""
        super().train(mode)
        if self.affine_frozen:
            self.affine.eval()
        return self

    def vsvf_for(self, full_shape: Sequence[int]) -> VSVF:
        """The :class:`VSVF` model for a fixed grid of spatial shape ``full_shape`` (cached)."""
        key = tuple(int(s) for s in full_shape)
        if len(key) != 3:
            raise ValueError(f"expected a 3-D shape, got {full_shape}")
        vs = self._vsvf_cache.get(key)
        if vs is None:
            c = self.config
            vs = VSVF(key, sigmas=c.sigmas, weights=c.sigma_weights, steps=c.time_steps,
                      method=c.integrator)
            self._vsvf_cache[key] = vs  # type: ignore[index]
        return vs

    def _affine_pass(self, moving: torch.Tensor, fixed: torch.Tensor, A0: torch.Tensor | None,
                     b0: torch.Tensor | None, steps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.affine_frozen:
            n = self.affine.steps_test if steps is None else steps
            with torch.no_grad():
                out = self.affine(moving, fixed, A0, b0, steps=n)
            A, b = out.A.detach(), out.b.detach()
        else:
            out = self.affine(moving, fixed, A0, b0, steps=steps)
            A, b = out.A, out.b
        if self.config.affine_guard and not self.training and out.steps:
            A, b = self._guarded_affine(moving, fixed, A0, b0, out.steps)
        return A, b

    @torch.no_grad()
    def _guarded_affine(self, moving: torch.Tensor, fixed: torch.Tensor, A0: torch.Tensor | None,
                        b0: torch.Tensor | None, steps: list[tuple[torch.Tensor, torch.Tensor]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per batch item, the affine among (initial, step 1, ..., step T) with the lowest mk-LNCC."""
        B = fixed.shape[0]
        shape = tuple(int(s) for s in fixed.shape[2:])
        if A0 is None or b0 is None:
            A0, b0 = identity_affine(B, dtype=torch.float32, device=fixed.device)
        cands = [(A0.float().expand(B, 3, 3), b0.float().expand(B, 3))] + [(a.detach(), t.detach()) for a, t in steps]
        scores = torch.stack([
            torch.stack([self._sim(warp(moving[i:i + 1], affine_map(a[i:i + 1], t[i:i + 1], shape)), fixed[i:i + 1])
                         for i in range(B)]) for a, t in cands])  # (T + 1, B)
        best = scores.argmin(0)
        self.last_affine_choice = [int(k) for k in best]
        A = torch.stack([cands[int(k)][0][i] for i, k in enumerate(best)])
        b = torch.stack([cands[int(k)][1][i] for i, k in enumerate(best)])
        return A, b

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        A0: torch.Tensor | None = None,
        b0: torch.Tensor | None = None,
        *,
        affine_steps: int | None = None,
        vsvf_steps: int | None = None,
        with_loss: bool = False,
    ) -> AVSMOutput:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``(B, 1, d, h, w)`` moving image on any grid, intensities in [0, 1].
            fixed: ``(B, 1, D, H, W)`` fixed image, ``D, H, W`` divisible by 16 when
                ``vsvf_steps > 0``.
            A0, b0: ``(B, 3, 3)``, ``(B, 3)`` initial affine (default identity).
            affine_steps, vsvf_steps: step counts (default: the config's train/test
                counts by ``self.training``); ``vsvf_steps = 0`` gives the affine result.
            with_loss: fill ``losses`` with the one-direction vSVF loss terms.

        Returns:
            :class:`AVSMOutput`.
        """
        c = self.config
        shape = tuple(int(s) for s in fixed.shape[2:])
        n_v = (c.vsvf_steps_train if self.training else c.vsvf_steps_test) if vsvf_steps is None else int(vsvf_steps)
        if n_v > 0 and any(s % DIVISOR for s in shape):
            raise ValueError(f"fixed grid {shape} must be divisible by {DIVISOR} for the vSVF network")
        A, b = self._affine_pass(moving, fixed, A0, b0, affine_steps)
        phi = affine_map(A, b, shape)
        vs = self.vsvf_for(shape) if n_v > 0 else None
        velocities: list[torch.Tensor] = []
        momenta: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        energies: list[torch.Tensor] = []
        losses: dict[str, torch.Tensor] = {}
        warped = warp(moving, phi)
        sim_total = torch.zeros((), device=fixed.device)
        reg_total = torch.zeros((), device=fixed.device)
        for _ in range(n_v):
            assert vs is not None
            with _autocast(fixed.device, c.amp):
                m = self.momentum(torch.cat([warped, fixed], dim=1))
            m = m.float()
            step = vs(m, phi)
            phi = step.phi
            warped = warp(moving, phi)
            velocities.append(step.v)
            momenta.append(m)
            maps.append(phi)
            energies.append(step.energy)
            if with_loss:
                sim_total = sim_total + self._sim(warped, fixed)
                reg_total = reg_total + step.energy.mean()
        if with_loss:
            losses = {"sim": sim_total, "reg": reg_total, "total": sim_total + c.lambda_vr * reg_total}
        return AVSMOutput(A=A, b=b, phi=phi, velocities=velocities, momenta=momenta, warped=warped,
                          losses=losses, maps=maps, energies=energies)

    # ------------------------------------------------------------------ training losses

    def training_loss(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        A0: torch.Tensor | None = None,
        b0: torch.Tensor | None = None,
        *,
        stage: str = "vsvf",
        epoch: float = 0.0,
        affine_steps: int | None = None,
        vsvf_steps: int | None = None,
        symmetric: bool = True,
        moving_labels: torch.Tensor | None = None,
        fixed_labels: torch.Tensor | None = None,
        dice_weight: float = 0.0,
        dice_labels: int = 16,
        target_map: torch.Tensor | None = None,
        distill_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """The training loss of ``stage`` (``affine`` or ``vsvf``) on a batch.

        Both images must lie on grids of the same shape (symmetric mode swaps them).

        Args:
            moving, fixed: ``(B, 1, D, H, W)`` images in [0, 1].
            A0, b0: initial affine (default identity).
            stage: ``affine`` (multi-step affine loss, vSVF unused) or ``vsvf``.
            epoch: (fractional) epoch for the decaying affine regulariser.
            affine_steps, vsvf_steps: step counts (default: train counts).
            symmetric: also register ``(fixed, moving)`` and add the consistency terms.
            moving_labels, fixed_labels: ``(B, 1, D, H, W)`` integer label maps of one
                protocol, for the optional Dice term (:func:`avsm.losses.dice.warped_dice_loss`;
                both directions when ``symmetric`` in the vSVF stage, the forward one in the
                affine stage).
            dice_weight: weight of the Dice term (0: the paper's unsupervised loss only).
            dice_labels: labels per pair in the Dice term (a random subset when more are shared).
            target_map: ``(B, 3, D, H, W)`` a target map of the forward direction (vSVF stage), e.g.
                vSVF-opt's (:mod:`avsm.train.prealign`); adds ``distill_weight ·``
                :func:`avsm.losses.distill.map_distance_vox` (voxels² of the grid; reported as
                ``distill`` whatever its weight).
            distill_weight: weight of that supervised term.

        Returns:
            Named scalars; ``total`` is the one to back-propagate (``dice`` is ``1 −`` mean
            soft Dice, reported even when its weight is 0 and labels are given).
        """
        c = self.config
        B = fixed.shape[0]
        if A0 is None or b0 is None:
            A0, b0 = identity_affine(B, dtype=torch.float32, device=fixed.device)
        labelled = moving_labels is not None and fixed_labels is not None
        if stage == "affine":
            aout, losses = self.affine.loss(moving, fixed, A0, b0, epoch=epoch, steps=affine_steps,
                                            symmetric=symmetric, sym_weight=c.lambda_as, reg_C=c.lambda_ar_C,
                                            reg_K=c.lambda_ar_K, reg_min=c.lambda_ar_min, similarity=self._sim)
            if labelled:
                phi = affine_map(aout.A, aout.b, tuple(int(s) for s in fixed.shape[2:]))
                dice = warped_dice_loss(moving_labels, fixed_labels, phi, dice_labels)  # type: ignore[arg-type]
                losses = {**losses, "dice": dice.detach()}
                if dice_weight > 0:
                    losses["total"] = losses["total"] + dice_weight * dice
            return losses
        if stage != "vsvf":
            raise ValueError(f"unknown stage {stage!r}")
        n_v = c.vsvf_steps_train if vsvf_steps is None else int(vsvf_steps)
        if symmetric:
            if moving.shape != fixed.shape:
                raise ValueError("symmetric training needs moving and fixed on grids of the same shape")
            Ai, bi = invert_affine(A0.float(), b0.float())
            mv = torch.cat([moving, fixed], 0)
            fx = torch.cat([fixed, moving], 0)
            out = self.forward(mv, fx, torch.cat([A0.float(), Ai], 0), torch.cat([b0.float(), bi], 0),
                               affine_steps=affine_steps, vsvf_steps=n_v, with_loss=True)
        else:
            out = self.forward(moving, fixed, A0, b0, affine_steps=affine_steps, vsvf_steps=n_v,
                               with_loss=True)
        nvox = float(math.prod(fixed.shape[2:]))
        # batch means over both directions: the average of the two directions' losses
        sim, reg = out.losses["sim"], out.losses["reg"]
        sym = torch.zeros((), device=fixed.device)
        if symmetric:
            for phi in out.maps:
                sym = sym + map_inverse_consistency(phi[:B], phi[B:]).mean()
        total = sim + c.lambda_vr * reg + (c.lambda_vs * nvox * sym if symmetric else 0.0)
        terms = {"sim": sim.detach(), "reg": reg.detach(), "sym": sym.detach()}
        if labelled:
            dice = warped_dice_loss(moving_labels, fixed_labels, out.phi[:B], dice_labels)  # type: ignore[arg-type]
            if symmetric:
                dice = 0.5 * (dice + warped_dice_loss(fixed_labels, moving_labels,  # type: ignore[arg-type]
                                                      out.phi[B:], dice_labels))
            terms["dice"] = dice.detach()
            if dice_weight > 0:
                total = total + dice_weight * dice
        if target_map is not None:
            distill = map_distance_vox(out.phi[:B], target_map.to(out.phi.dtype)).mean()
            terms["distill"] = distill.detach()
            if distill_weight > 0:
                total = total + distill_weight * distill
        return {"total": total, **terms}

    # ------------------------------------------------------------------ persistence

    def export_state(self) -> dict[str, Any]:
        """``{"config": dict, "state_dict": ...}``: what :func:`avsm.models.pretrained.load_pretrained` reads.

        With a :attr:`domain` reference, also ``{"meta": {"domain": dict}}``; with training
        history, ``{"meta": {"trained_epochs": {stage: epochs}}}``.
        """
        state: dict[str, Any] = {"format": "avsm-model/1", "config": self.config.to_dict(),
                                 "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        meta: dict[str, Any] = {}
        if self.domain is not None:
            meta["domain"] = self.domain.to_dict()
        if self.trained_epochs:
            meta["trained_epochs"] = {k: float(v) for k, v in self.trained_epochs.items()}
        if meta:
            state["meta"] = meta
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AVSM:
        """Rebuild a model from :meth:`export_state`'s dict (strict key check).

        ``state["meta"]["domain"]``, when present, becomes :attr:`domain`.
        """
        cfg = dict(state["config"])
        cfg.setdefault("affine_moments", False)  # saved before the moment head existed
        model = cls(AVSMConfig.from_dict(cfg))
        model.load_state_dict(state["state_dict"], strict=True)
        meta = state.get("meta") or {}
        domain = meta.get("domain")
        model.domain = DomainReference.from_dict(domain) if domain else None
        model.trained_epochs = {str(k): float(v) for k, v in (meta.get("trained_epochs") or {}).items()}
        return model
