"""Pre-aligned training pairs for the vSVF network, and distillation targets from vSVF-opt.

The paper (and LUMIR) train the deformable network on pairs that are already affinely
aligned.  Here each training subject is registered **once** to a template by affine-opt
(:func:`template_affines`): ``T_s`` maps the template's working unit coordinates to subject
``s``'s.  A pair (moving ``i``, fixed ``j``) is then pre-aligned by the composed affine
``T_i ∘ T_j⁻¹`` (fixed unit → template unit → moving unit, :func:`pair_affine`), with no
registration per pair.

:class:`AlignedPairs` draws such pairs and makes each image with **one** resampling of its
original: the fixed image is warped by a random spatial augmentation ``ψ`` (the same for both
sides), the moving image by ``ρ ∘ T_i ∘ T_j⁻¹ ∘ ψ``, where ``ρ`` is a small random residual
affine (what an affine stage leaves) applied pointwise to the map; affines act on the map's
values, so the chain is composed exactly and the moving image is interpolated once.

Distillation (:func:`distillation_target`): vSVF-opt on a pre-aligned pair, on the network's
own grid with the network's own kernel and integrator, gives a momentum ``m*`` on the network's
momentum grid; one step of the network's :class:`avsm.models.vsvf.VSVF` turns ``m*`` back into
exactly opt's map (the round trip is tested).  :class:`DistillPairs` holds a fixed set of such pairs
with their targets (cached on disk); :meth:`avsm.models.avsm.AVSM.training_loss` adds
``distill_weight ·`` the mean squared map difference (voxels² of the network grid) to the
unsupervised loss (a supervised warm start, as Quicksilver's for LDDMM momentum).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avsm.core.coords import affine_on_map, compose_affine, identity_map, invert_affine
from avsm.core.sampling import Pyramid, warp
from avsm.optim.affine_opt import AffineOptConfig, optimise_affine
from avsm.optim.initialise import initial_affine, rotation_angle
from avsm.optim.vsvf_opt import VSVFOptConfig, optimise_vsvf
from avsm.train.augment import AugmentConfig, augment_intensity, random_affine, random_map
from avsm.train.data import CohortVolume, EpochDataset, draw_pair, sample_seed

log = logging.getLogger(__name__)

__all__ = ["AlignConfig", "AlignedPairs", "DistillPairs", "MAX_TARGET_DISPLACEMENT", "TEMPLATE_AFFINE",
           "affine_on_map", "check_target", "decompose_mm", "distillation_config", "distillation_target",
           "pair_affine", "plausible_affine", "template_affine", "template_affines"]

#: the largest displacement (unit coordinates: a quarter of the box) a distillation target may have
MAX_TARGET_DISPLACEMENT = 0.25
#: affine-opt of a subject to the template on a ~4 mm working grid (levels ~8 and ~4 mm)
TEMPLATE_AFFINE = AffineOptConfig(scales=(0.5, 1.0), iterations=(80, 40), lr=1e-2, tol=1e-4, window=10)


def template_affine(subject: torch.Tensor, subject_u2w: np.ndarray, template: torch.Tensor,
                    template_u2w: np.ndarray, config: AffineOptConfig = TEMPLATE_AFFINE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine-opt of ``subject`` to ``template`` (fixed), from inference's automatic initialisation.

    Args:
        subject: ``(1, 1, d, h, w)`` in [0, 1] on its working grid (``subject_u2w``: unit → world).
        template: ``(1, 1, D, H, W)`` likewise.

    Returns:
        ``(A (1, 3, 3), b (1, 3))`` float32: template unit coordinates → subject unit coordinates.
    """
    init = initial_affine(template, subject, template_u2w, subject_u2w, "auto")
    A, b = optimise_affine(Pyramid(template), Pyramid(subject), init.A0, init.b0, config, progress=False)
    return A.detach().float(), b.detach().float()


def template_affines(volumes: Sequence[CohortVolume], template: torch.Tensor, template_u2w: np.ndarray, *,
                     cache: str | os.PathLike[str] | None = None,
                     config: AffineOptConfig = TEMPLATE_AFFINE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`template_affine` of every subject's skull-stripped brain (``template``: a stripped
    template), computed once (cached per subject).

    The cache key is the subject ID, the template's shape and a checksum of its voxels, and the
    affine-opt settings: a different template or setting recomputes.
    """
    key_base = hashlib.sha1(np.ascontiguousarray(template.numpy()).tobytes()[::97]
                            + repr((tuple(template.shape), config)).encode()).hexdigest()[:10]
    out = []
    for v in volumes:
        path = Path(cache) / f"tpl_{v.subject}_{key_base}.npz" if cache is not None else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                out.append((torch.from_numpy(z["A"]), torch.from_numpy(z["b"])))
            continue
        A, b = template_affine(v.brain, v.unit_to_world, template, template_u2w, config)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: ranks may race
            np.savez(tmp, A=A.numpy(), b=b.numpy())
            os.replace(tmp, path)
        out.append((A, b))
    log.info("template affines: %d subjects", len(out))
    return out


def decompose_mm(A: torch.Tensor, moving_u2w: np.ndarray, fixed_u2w: np.ndarray) -> tuple[float, np.ndarray, float]:
    """An affine between two working grids in millimetres, split by the polar decomposition ``R S``.

    Args:
        A: ``(1, 3, 3)`` fixed unit → moving unit (tensor-axis order, as ``unit_to_world`` takes them).
        moving_u2w, fixed_u2w: ``(4, 4)`` unit → world of the two grids.

    Returns:
        ``(rotation angle in degrees, log-eigenvalues (3,) of the stretch S in ascending order,
        largest |S_ij|, i ≠ j)``; a reflection gives ``(180, inf, inf)``.
    """
    A_mm = moving_u2w[:3, :3] @ A[0].double().numpy() @ np.linalg.inv(fixed_u2w[:3, :3])
    if np.linalg.det(A_mm) <= 0:  # a reflection (or a collapse) is no anatomy
        return 180.0, np.full(3, np.inf), float("inf")
    U, _, Vt = np.linalg.svd(A_mm)
    R = U @ Vt
    if np.linalg.det(R) < 0:
        U[:, -1] *= -1
        R = U @ Vt
    S = R.T @ A_mm
    angle = float(np.degrees(rotation_angle(R)))
    off = float(np.abs(S - np.diag(np.diag(S))).max())
    return angle, np.log(np.linalg.eigvalsh(0.5 * (S + S.T))), off


def plausible_affine(T: tuple[torch.Tensor, torch.Tensor], subject_u2w: np.ndarray, template_u2w: np.ndarray,
                     max_rotation_deg: float = 30.0, max_log_scale: float = 0.4) -> bool:
    """Whether a template → subject affine looks like anatomy (rotation ≤ 30°, scales within e^±0.4)
    rather than a failed registration (a flipped axis, a neck matched to a brain)."""
    angle, ls, _ = decompose_mm(T[0], subject_u2w, template_u2w)
    return angle <= max_rotation_deg and float(np.abs(ls).max()) <= max_log_scale


def pair_affine(moving_T: tuple[torch.Tensor, torch.Tensor], fixed_T: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-alignment of a pair: ``T_moving ∘ T_fixed⁻¹`` (fixed unit → moving unit).

    Args:
        moving_T, fixed_T: ``(A (1, 3, 3), b (1, 3))`` template → subject affines.
    """
    Ai, bi = invert_affine(fixed_T[0].double(), fixed_T[1].double())
    A, b = compose_affine(moving_T[0].double(), moving_T[1].double(), Ai, bi)
    return A.float(), b.float()


@dataclass(frozen=True)
class AlignConfig:
    """Randomness of :class:`AlignedPairs`.

    Attributes:
        shared: spatial augmentation ``ψ`` of the pair (both images; keeps the pair aligned).
        residual_rotation_deg, residual_scale, residual_shear, residual_translation: ranges of
            the residual affine ``ρ`` on the moving side (translation in unit coordinates);
            scaled by ``U(0, 1)`` per pair.
        p_strip: probability that a pair is skull-stripped (both sides).
    """

    shared: AugmentConfig = AugmentConfig(warp_amplitude=0.02)
    residual_rotation_deg: float = 3.0
    residual_scale: float = 0.03
    residual_shear: float = 0.02
    residual_translation: float = 0.015
    p_strip: float = 0.5


class AlignedPairs(EpochDataset):
    """Cross-subject training pairs pre-aligned by composed template affines (see module doc).

    Item ``i`` of epoch ``e`` draws from :func:`sample_seed` ``(seed, e, i)``: two different
    subjects, stripped or not (both alike), ``ψ`` on the fixed grid, ``ρ``; both images are
    resampled once from their originals.  ``A0, b0`` of the item is the identity: the pair is
    already aligned.

    Items: ``{"moving", "fixed": (1, D, H, W) float32 on the fixed grid, "moving_labels",
    "fixed_labels": (1, D, H, W) int64, "pair": (2,), "source": "ixi-aligned"}`` and, with
    ``return_maps``, ``"moving_map"``/``"fixed_map"`` ``(3, D, H, W)`` (the single maps used).
    """

    def __init__(self, volumes: Sequence[CohortVolume], affines: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 length: int, *, seed: int = 0, config: AlignConfig | None = None,
                 augment: bool = True, return_maps: bool = False) -> None:
        if len(volumes) < 2 or len(volumes) != len(affines):
            raise ValueError("AlignedPairs needs at least two subjects and one template affine per subject")
        super().__init__(length, seed)
        self.volumes, self.affines = list(volumes), list(affines)
        self.cfg = config if config is not None else AlignConfig()
        self.augment, self.return_maps = bool(augment), bool(return_maps)

    def maps(self, i: int, j: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fixed map ψ, moving map ρ ∘ T_i ∘ T_j⁻¹ ∘ ψ)``, each ``(1, 3, *fixed shape)``."""
        shape = tuple(int(s) for s in self.volumes[j].whole.shape[2:])
        cfg = self.cfg
        if self.augment:
            shared = cfg.shared
            if shared.random_strength:
                shared = shared.scaled(float(torch.rand((), generator=g)))
            psi = random_map(g, shape, shared)  # type: ignore[arg-type]
        else:
            psi = identity_map(shape)
        A, b = pair_affine(self.affines[i], self.affines[j])
        phi = affine_on_map(A, b, psi)
        if self.augment:
            k = float(torch.rand((), generator=g))
            rcfg = AugmentConfig(rotation_deg=k * cfg.residual_rotation_deg, scale=k * cfg.residual_scale,
                                 shear=k * cfg.residual_shear, translation=k * cfg.residual_translation)
            Ar, br = random_affine(g, rcfg)
            phi = affine_on_map(Ar, br, phi)
        return psi, phi

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = self.generator(index)
        i, j = draw_pair(g, len(self.volumes))
        strip = float(torch.rand((), generator=g)) < self.cfg.p_strip
        vm, vf = self.volumes[i], self.volumes[j]
        with torch.no_grad():
            psi, phi = self.maps(i, j, g)
            m = warp(vm.brain if strip else vm.whole, phi)
            f = warp(vf.brain if strip else vf.whole, psi)
            ml = warp(vm.labels.to(torch.int64), phi, mode="nearest")
            fl = warp(vf.labels.to(torch.int64), psi, mode="nearest")
            if self.augment:
                m = augment_intensity(m, g, self.cfg.shared)
                f = augment_intensity(f, g, self.cfg.shared)
        item = {"moving": m[0].float(), "fixed": f[0].float(), "moving_labels": ml[0], "fixed_labels": fl[0],
                "pair": torch.tensor([i, j]), "source": "ixi-aligned"}
        if self.return_maps:
            item["moving_map"], item["fixed_map"] = phi[0], psi[0]
        return item


# --------------------------------------------------------------------------- distillation


def distillation_config(model_config: Any, lncc_windows: Sequence[int] = (5, 9),
                        iterations: tuple[int, int] = (60, 40)) -> VSVFOptConfig:
    """vSVF-opt on the network's grid with the network's kernel, integrator and regulariser weight
    (``model_config``: an :class:`avsm.models.avsm.AVSMConfig`), at 1/2 and 1 of its grid, so that
    its finest momentum lives on the network's momentum grid.

    Raises:
        ValueError: the model weighs its Gaussians other than ∝ σ (vSVF-opt's only weighting), so
            opt's map would not be one the network can produce.
    """
    if getattr(model_config, "sigma_weights", None) is not None:
        raise ValueError("distillation needs a model with the default kernel weights (∝ σ); "
                         f"this one has sigma_weights={model_config.sigma_weights}")
    return VSVFOptConfig(scales=(0.5, 1.0), iterations=iterations, reg_weight=float(model_config.lambda_vr),
                         integrator=model_config.integrator, time_steps=int(model_config.time_steps),
                         sigmas=tuple(model_config.sigmas), lncc_windows=tuple(lncc_windows),
                         optimizer="lbfgs-nols", lr=0.5, min_size=8)


def distillation_target(moving: torch.Tensor, fixed: torch.Tensor, config: VSVFOptConfig
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """vSVF-opt's momentum and map on a pre-aligned pair (identity start).

    Args:
        moving, fixed: ``(1, 1, D, H, W)`` on the same (network) grid.
        config: :func:`distillation_config`.

    Returns:
        ``(momentum (1, 3, d, h, w), map (1, 3, D, H, W))``; ``d, h, w`` = the network's momentum grid.

    Raises:
        FloatingPointError: vSVF-opt diverged (a displacement beyond
            :data:`MAX_TARGET_DISPLACEMENT` of the box, or NaN), also with the line search.
    """
    shape = tuple(int(s) for s in fixed.shape[2:])
    phi0 = identity_map(shape)
    try:
        res = optimise_vsvf(fixed, moving, phi0, config, progress=False)
    except FloatingPointError as e:
        # L-BFGS without a line search can overshoot with a wide kernel: redo this pair with one
        log.warning("distillation target: %s; again with the line search", e)
        res = optimise_vsvf(fixed, moving, phi0, dataclasses.replace(config, optimizer="lbfgs", lr=1.0),
                            progress=False)
    check_target(res.phi)
    return res.momentum.detach().float(), res.phi.detach().float()


def check_target(phi: torch.Tensor) -> None:
    """Raise :class:`FloatingPointError` when a target map ``(B, 3, D, H, W)`` moves a point farther
    than :data:`MAX_TARGET_DISPLACEMENT` (or holds NaN): vSVF-opt diverged."""
    disp = float((phi - identity_map(phi.shape[2:]).to(phi)).abs().max())
    if not disp <= MAX_TARGET_DISPLACEMENT:  # also NaN
        raise FloatingPointError(f"vSVF-opt diverged (a displacement of {disp:.3g} of the box)")


class DistillPairs(Dataset):
    """A fixed set of pre-aligned pairs (items of ``pairs`` with ``augment=False``) and their vSVF-opt
    targets, computed once and cached (``cache``: one ``.npz`` per item).

    Items: those of :class:`AlignedPairs` plus ``"target_map"`` ``(3, D, H, W)`` (what the loss
    uses: a network with several vSVF steps is compared by its final map) and
    ``"target_momentum"`` ``(3, d, h, w)`` (opt's one-step momentum on the network's momentum
    grid: one step of the network's VSVF with it is ``target_map``); ``A0, b0`` is the identity.
    The cache key holds a checksum of the pair's two images and the vSVF-opt settings, so a
    different template, grid, cohort or setting never reads another pair's target.
    """

    def __init__(self, pairs: AlignedPairs, n: int, config: VSVFOptConfig, *,
                 cache: str | os.PathLike[str] | None = None) -> None:
        self.pairs, self.n, self.config = pairs, int(n), config
        self.cache = Path(cache) if cache is not None else None
        self.epoch = 0
        self.valid = list(range(self.n))  # the pairs items are drawn among (prepare() removes diverged ones)
        self._items: dict[int, dict[str, Any]] = {}

    def set_epoch(self, epoch: int) -> None:
        """The targets are fixed: the epoch changes nothing (kept for the mixture's interface)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def _key(self, item: dict[str, Any]) -> str:
        h = hashlib.sha1(repr(self.config).encode())
        for name in ("moving", "fixed"):
            h.update(np.ascontiguousarray(item[name].numpy()).tobytes())
        return h.hexdigest()[:16]

    def prepare(self) -> None:
        """Compute (or read from the cache) every target now, before training starts; a pair whose
        vSVF-opt diverged is left out (logged), and the items are drawn among the others."""
        valid = []
        for k in range(self.n):
            try:
                self._item(k)
                valid.append(k)
            except FloatingPointError as e:
                log.warning("distillation pair %d left out: %s", k, e)
        if not valid:
            raise FloatingPointError("vSVF-opt diverged on every distillation pair")
        self.valid = valid
        log.info("distillation targets: %d pairs (%d left out)", len(valid), self.n - len(valid))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index`` of the current epoch: one of the ``n`` pairs, drawn by :func:`sample_seed`
        ``(seed, epoch, index)``, with replacement (each epoch its own draw, reproducibly)."""
        g = torch.Generator().manual_seed(sample_seed(self.pairs.seed + 31, self.epoch, int(index)))
        return self._item(self.valid[int(torch.randint(len(self.valid), (), generator=g))])

    def _item(self, k: int) -> dict[str, Any]:
        if k in self._items:
            return self._items[k]
        self.pairs.set_epoch(0)
        item = dict(self.pairs[k])
        path = self.cache / f"distill_{self._key(item)}.npz" if self.cache is not None else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                mom, phi = torch.from_numpy(z["momentum"]), torch.from_numpy(z["map"])
            check_target(phi[None])  # a target cached before this check existed
        else:
            mom, phi = distillation_target(item["moving"][None], item["fixed"][None], self.config)
            mom, phi = mom[0], phi[0]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: ranks may race
                np.savez(tmp, momentum=mom.numpy(), map=phi.numpy())
                os.replace(tmp, path)
        item["target_momentum"], item["target_map"] = mom, phi
        item["source"] = "distill"
        self._items[k] = item
        return item
