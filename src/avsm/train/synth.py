"""Training images synthesised from label maps (SynthSeg / SynthMorph style).

A label map is enough to make an unlimited supply of registration pairs:
deform it with a random smooth diffeomorphism, paint every label with a random
Gaussian intensity (a new random contrast per image), then add the nuisances
of real scans (partial-volume blur, a smooth multiplicative bias field, a
gamma curve, noise) and rescale to [0, 1] as the registration sees images.
A network trained on such pairs never sees one fixed contrast, which is what
makes it contrast-agnostic (Hoffmann et al., *SynthMorph*, IEEE TMI 2022;
Billot et al., *SynthSeg*, MedIA 2023).

Conventions: tensors are channels-first ``(1, 1, D, H, W)``, images
``float32`` on the CPU, label maps integer (dtype kept); maps follow
:mod:`avsm.core.coords` (pull-back, unit coordinates).  Every random draw
comes from the :class:`torch.Generator` passed in, so an output is a pure
function of the generator's seed (and of the inputs).

Pipeline of :func:`synthesise_image` (parameters in :class:`SynthConfig`)::

    labels --(skull strip?)--> labels_out --mixture--> mu[l] + sigma[l] * N(0, 1)
           --blur--> --x bias field--> --min-max--> --^gamma--> --+ noise--> --min-max--> image

Non-brain labels
    The SynthSeg training label maps (``synthseg-label-maps/`` of the shared
    data, 256³ at 1 mm) contain these values, each in every one of the 20 maps
    unless stated:

    * FreeSurfer aseg brain structures: 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14,
      15, 16, 17, 18, 26, 28, 41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54,
      58, 60; CSF 24; lesions 25 / 57; vessels 30 / 62; 5th ventricle 72 (9 of
      20 maps); optic chiasm 85; 136 / 137 and 163 / 164 (small structures in
      the FreeSurfer LUT, "caudate-putamen" and "subcortical grey matter";
      every voxel of them touches ventricles, white matter or the hippocampus).
    * Extra-cerebral tissue, SynthSeg's own numbering in 500–530 (skull,
      scalp, fat, eyes, muscle, ...; nothing there touches the brain except
      through CSF 24 and the brainstem 16): 502, 506, 507, 508, 509, 511, 512,
      514, 515, 516, 530.

    :data:`NON_BRAIN_LABELS` is the second list; skull stripping sets those
    labels to 0 (background) and keeps everything else, CSF 24 included (it is
    brain-adjacent and part of a typical brain mask).  :data:`BRAIN_LABELS` is
    the first list.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch

from avsm.core.coords import identity_map
from avsm.core.integrate import svf_exp
from avsm.core.sampling import gaussian_blur, resample_map, warp
from avsm.io.image import load_image, resample
from avsm.train.augment import AugmentConfig, _smooth_field, random_velocity
from avsm.train.data import EpochDataset

__all__ = [
    "BRAIN_LABELS",
    "NON_BRAIN_LABELS",
    "SynthConfig",
    "SynthPairs",
    "SynthParams",
    "deform_labels",
    "load_label_maps",
    "mixture",
    "random_deformation",
    "render_image",
    "sample_params",
    "skull_strip",
    "synthesise_image",
]

log = logging.getLogger(__name__)

#: Label values of the SynthSeg label maps kept by skull stripping (see the module doc).
BRAIN_LABELS: tuple[int, ...] = (
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 26, 28, 30,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 72, 85, 136, 137, 163, 164,
)

#: Extra-cerebral label values of the SynthSeg label maps, removed by skull stripping.
NON_BRAIN_LABELS: tuple[int, ...] = (502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530)


def _check_range(name: str, r: tuple[float, float], lo: float = 0.0, hi: float = math.inf) -> None:
    if len(r) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in r):
        raise ValueError(f"{name} must be a pair of finite numbers, got {r!r}")
    if not lo <= r[0] <= r[1] <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {r!r}")


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the synthesis.  Intensities are in the units of the per-label
    means, which lie in [0, 1]; lengths are in voxels of the label map's grid.

    Attributes:
        max_displacement: largest displacement of the random deformation along
            any axis (voxels, >= 0).  The deformation is ``exp(v)`` of a smooth
            stationary velocity ``v`` whose largest component is scaled to
            ``s * max_displacement`` voxels (``s ~ U(0, 1)`` with
            ``random_strength``, else 1); ``|exp(v)(x) - x| <= max |v|`` per axis,
            so no voxel moves farther than this.  0 turns deformation off.
        control_points: size of the velocity's control grid per axis (>= 2):
            Gaussian noise on ``control_points³`` nodes, trilinearly upsampled;
            more nodes give a less smooth field.
        random_strength: draw the strength ``s`` above (nearly aligned pairs as
            common as strongly deformed ones); ``False`` uses ``s = 1``.
        label_interpolation: how the label map is pulled through the
            deformation: ``"nearest"`` or ``"label"`` (arg-max of the trilinearly
            interpolated one-hot; smoother, one interpolation per label, slower).
            Neither invents a label value.
        mean_range: per-label mean intensity ``mu ~ U(mean_range)`` (SynthSeg: [0, 1]).
        std_range: per-label intensity std ``sigma ~ U(std_range)`` (intensity units).
        blur_sigma_range: partial-volume blur, Gaussian sigma per axis
            ``~ U(blur_sigma_range)`` (voxels; 0 = no blur).
        bias_strength: std of the log bias field is ``~ U(0, bias_strength)``;
            the image is multiplied by ``exp(field)`` (0 = no bias field).
        bias_control: control-grid size per axis of the bias field (>= 2).
        gamma_log_std: gamma exponent ``gamma = exp(z)``, ``z ~ N(0, gamma_log_std²)``
            (log-normal; 0 gives gamma = 1), applied to the image rescaled to [0, 1].
        noise_std_range: std of additive Gaussian noise ``~ U(noise_std_range)``
            (in units of the [0, 1] image before the final rescale).
        p_skull_strip: probability that the non-brain labels are removed (set to 0).
        non_brain_labels: label values removed by skull stripping (FreeSurfer /
            SynthSeg convention, see :data:`NON_BRAIN_LABELS`).
    """

    max_displacement: float = 4.0
    control_points: int = 6
    random_strength: bool = True
    label_interpolation: Literal["nearest", "label"] = "nearest"
    mean_range: tuple[float, float] = (0.0, 1.0)
    std_range: tuple[float, float] = (0.01, 0.1)
    blur_sigma_range: tuple[float, float] = (0.0, 1.0)
    bias_strength: float = 0.3
    bias_control: int = 4
    gamma_log_std: float = 0.25
    noise_std_range: tuple[float, float] = (0.0, 0.05)
    p_skull_strip: float = 0.5
    non_brain_labels: tuple[int, ...] = NON_BRAIN_LABELS

    def __post_init__(self) -> None:
        def nonneg(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

        for name in ("max_displacement", "bias_strength", "gamma_log_std"):
            nonneg(name)
        for name in ("control_points", "bias_control"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
        if self.label_interpolation not in ("nearest", "label"):
            raise ValueError(f"label_interpolation must be 'nearest' or 'label', got {self.label_interpolation!r}")
        # ranges given as lists (e.g. from JSON) become tuples, so the config stays hashable
        for name in ("mean_range", "std_range", "blur_sigma_range", "noise_std_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_range("mean_range", self.mean_range)
        _check_range("std_range", self.std_range)
        _check_range("blur_sigma_range", self.blur_sigma_range)
        _check_range("noise_std_range", self.noise_std_range)
        if not isinstance(self.p_skull_strip, (int, float)) or not 0.0 <= self.p_skull_strip <= 1.0:
            raise ValueError(f"p_skull_strip must be in [0, 1], got {self.p_skull_strip!r}")
        labels = tuple(self.non_brain_labels)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
            raise ValueError(f"non_brain_labels must be integers, got {self.non_brain_labels!r}")
        if 0 in labels:
            raise ValueError("non_brain_labels must not contain the background label 0")
        object.__setattr__(self, "non_brain_labels", tuple(sorted({int(v) for v in labels})))

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict of the fields (JSON-serialisable)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True, eq=False)
class SynthParams:
    """The scalar random draws of one synthesised image (see :func:`sample_params`).

    Attributes:
        strip: whether the non-brain labels were removed.
        values: ``(K,)`` int64, the label values present after stripping, sorted.
        means: ``(K,)`` float64, mean intensity of each label in ``values``.
        stds: ``(K,)`` float64, intensity std of each label in ``values``.
        blur_sigma: Gaussian sigma per tensor axis (D, H, W), voxels.
        bias_std: std of the log bias field.
        bias_control: control-grid size per axis of the bias field.
        gamma: gamma exponent.
        noise_std: std of the additive noise.
    """

    strip: bool
    values: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    blur_sigma: tuple[float, float, float]
    bias_std: float
    bias_control: int
    gamma: float
    noise_std: float


def _check_labels(labels: torch.Tensor) -> tuple[int, int, int]:
    if labels.dim() != 5 or labels.shape[:2] != (1, 1):
        raise ValueError(f"label map must have shape (1, 1, D, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"label map must have an integer dtype, got {labels.dtype}")
    return tuple(int(s) for s in labels.shape[2:])  # type: ignore[return-value]


def _uniform(g: torch.Generator, r: tuple[float, float], n: int = 1) -> torch.Tensor:
    return r[0] + (r[1] - r[0]) * torch.rand(n, generator=g, dtype=torch.float64)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] by min and max (a constant image becomes zeros)."""
    lo, hi = x.min(), x.max()
    if float(hi - lo) <= 0.0:
        return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- deformation


def random_deformation(shape: Sequence[int], g: torch.Generator, cfg: SynthConfig) -> torch.Tensor:
    """Random smooth diffeomorphic map ``exp(v)`` on a grid of ``shape``.

    ``v`` is :func:`avsm.train.augment.random_velocity` (Gaussian control grid of
    ``cfg.control_points`` nodes per axis, damped at the border, trilinear),
    integrated by scaling and squaring at half resolution and trilinearly
    upsampled.  Its largest component is ``s * cfg.max_displacement`` voxels
    (see :class:`SynthConfig`), which bounds every displacement.

    Args:
        shape: spatial shape ``(D, H, W)``.
        g: random generator.
        cfg: synthesis ranges.

    Returns:
        ``(1, 3, D, H, W)`` float32 pull-back map (unit coordinates).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 sizes >= 2, got {shape}")
    if cfg.max_displacement == 0:
        return identity_map(shape)
    strength = float(torch.rand((), generator=g, dtype=torch.float64)) if cfg.random_strength else 1.0
    low = tuple(max(s // 2, 4) for s in shape)
    v = random_velocity(g, low, AugmentConfig(warp_amplitude=1.0, warp_control=cfg.control_points))  # type: ignore[arg-type]
    vox = torch.tensor([n - 1 for n in shape], dtype=v.dtype).view(1, 3, 1, 1, 1)  # voxels per unit
    peak = float((v * vox).abs().max())
    if peak <= 0.0 or strength == 0.0:
        return identity_map(shape)
    v = v * (strength * cfg.max_displacement / peak)
    return resample_map(svf_exp(v), shape).contiguous()


def deform_labels(labels: torch.Tensor, g: torch.Generator, cfg: SynthConfig) -> torch.Tensor:
    """Pull a label map through a random smooth deformation (:func:`random_deformation`).

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map.
        g: random generator.
        cfg: synthesis ranges (``max_displacement``, ``control_points``,
            ``label_interpolation``).

    Returns:
        ``(1, 1, D, H, W)`` label map of the same dtype whose values all occur in
        ``labels`` (border padding: no label is invented, not even 0).
    """
    shape = _check_labels(labels)
    phi = random_deformation(shape, g, cfg)
    return warp(labels, phi, mode=cfg.label_interpolation, padding="border")


# --------------------------------------------------------------------------- intensities


def skull_strip(labels: torch.Tensor, non_brain: Sequence[int] = NON_BRAIN_LABELS) -> torch.Tensor:
    """Set the labels in ``non_brain`` to 0 (background).

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map.
        non_brain: label values to remove.

    Returns:
        A new label map of the same shape and dtype.
    """
    _check_labels(labels)
    drop = torch.as_tensor(sorted({int(v) for v in non_brain}), dtype=labels.dtype)
    if drop.numel() == 0:
        return labels.clone()
    return torch.where(torch.isin(labels, drop), torch.zeros((), dtype=labels.dtype), labels)


def sample_params(labels: torch.Tensor, g: torch.Generator, cfg: SynthConfig, *,
                  strip: bool | None = None) -> SynthParams:
    """Draw the scalar parameters of one synthesised image of ``labels``.

    Order of the draws: skull-strip decision (only when ``strip`` is ``None``),
    then per-label means and stds (one per value present after stripping, in
    ascending order), blur sigmas, bias std, gamma, noise std.

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map (before skull stripping).
        g: random generator.
        cfg: synthesis ranges.
        strip: force skull stripping on or off; ``None`` strips with probability
            ``cfg.p_skull_strip``.

    Returns:
        The draws (:class:`SynthParams`).
    """
    _check_labels(labels)
    if strip is None:
        strip = float(torch.rand((), generator=g, dtype=torch.float64)) < cfg.p_skull_strip
    lab = skull_strip(labels, cfg.non_brain_labels) if strip else labels
    values = torch.unique(lab).to(torch.int64)
    k = int(values.numel())
    means = _uniform(g, cfg.mean_range, k)
    stds = _uniform(g, cfg.std_range, k)
    blur = tuple(float(s) for s in _uniform(g, cfg.blur_sigma_range, 3))
    bias_std = float(_uniform(g, (0.0, cfg.bias_strength)))
    gamma = math.exp(float(torch.randn((), generator=g, dtype=torch.float64)) * cfg.gamma_log_std)
    noise = float(_uniform(g, cfg.noise_std_range))
    return SynthParams(bool(strip), values, means, stds, blur, bias_std, cfg.bias_control,  # type: ignore[arg-type]
                       gamma, noise)


def mixture(labels: torch.Tensor, params: SynthParams, g: torch.Generator) -> torch.Tensor:
    """Gaussian mixture image: voxel ``x`` of label ``l`` gets ``mu_l + sigma_l * N(0, 1)`` (i.i.d.).

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map whose values are all in ``params.values``.
        params: per-label ``means`` and ``stds``.
        g: random generator.

    Returns:
        ``(1, 1, D, H, W)`` float32 image (intensity units, not rescaled).

    Raises:
        ValueError: a label of ``labels`` has no parameters.
    """
    _check_labels(labels)
    flat = labels.reshape(-1).to(torch.int64)
    idx = torch.searchsorted(params.values, flat).clamp_(max=max(int(params.values.numel()) - 1, 0))
    if params.values.numel() == 0 or not bool((params.values[idx] == flat).all()):
        raise ValueError("the label map holds values that have no intensity parameters")
    mu = params.means.to(torch.float32)[idx]
    sd = params.stds.to(torch.float32)[idx]
    eps = torch.randn(flat.shape, generator=g, dtype=torch.float32)
    return (mu + sd * eps).reshape(labels.shape)


def render_image(labels: torch.Tensor, params: SynthParams, g: torch.Generator) -> torch.Tensor:
    """Synthesise an image of ``labels`` (already skull-stripped if ``params.strip``) from ``params``.

    Steps: :func:`mixture`, Gaussian blur (``params.blur_sigma`` voxels),
    times ``exp(field)`` (smooth field of std ``params.bias_std``, trilinear
    from a ``params.bias_control``-node grid), min–max to [0, 1],
    ``x ** params.gamma``, plus Gaussian noise of std ``params.noise_std``,
    min–max to [0, 1].

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map.
        params: draws from :func:`sample_params`.
        g: random generator (for the mixture noise, the bias field and the noise).

    Returns:
        ``(1, 1, D, H, W)`` float32 image in [0, 1].
    """
    shape = _check_labels(labels)
    x = mixture(labels, params, g)
    if max(params.blur_sigma) > 0:
        x = gaussian_blur(x, params.blur_sigma)
    if params.bias_std > 0:
        x = x * torch.exp(_smooth_field(g, shape, params.bias_control, params.bias_std))
    x = _minmax(x)
    if params.gamma != 1.0:
        x = x.pow(params.gamma)
    if params.noise_std > 0:
        x = x + params.noise_std * torch.randn(x.shape, generator=g, dtype=torch.float32)
    return _minmax(x).to(torch.float32)


def synthesise_image(labels: torch.Tensor, g: torch.Generator, cfg: SynthConfig, *,
                     strip: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image of a label map: optional skull strip, then the pipeline of the module doc.

    Equivalent to ``p = sample_params(labels, g, cfg, strip=strip)`` then
    :func:`render_image` of the (stripped) map with the same generator.

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map.
        g: random generator (the only source of randomness).
        cfg: synthesis ranges.
        strip: force skull stripping on or off; ``None`` strips with probability
            ``cfg.p_skull_strip``.

    Returns:
        ``(image, labels_out)``: ``(1, 1, D, H, W)`` float32 image in [0, 1], and the
        label map it was drawn from (``labels`` with the non-brain labels set to 0
        when stripped; same dtype).
    """
    params = sample_params(labels, g, cfg, strip=strip)
    lab = skull_strip(labels, cfg.non_brain_labels) if params.strip else labels
    return render_image(lab, params, g), lab


# --------------------------------------------------------------------------- dataset


class SynthPairs(EpochDataset):
    """Synthetic registration pairs drawn from label maps.

    Item ``i`` draws, from a generator seeded with
    :func:`avsm.train.data.sample_seed` ``(seed, epoch, i)`` (epoch 0 unless
    :meth:`set_epoch` is called): a moving map ``a`` uniformly among the maps; a
    fixed map ``b = a`` with probability ``p_same_map`` (else uniformly among the
    others); one skull-strip decision shared by both images (probability
    ``cfg.p_skull_strip``); then, for moving and for fixed in turn,
    :func:`deform_labels` and :func:`synthesise_image`.  Moving and fixed thus
    have independent deformations and contrasts.

    Args:
        label_maps: ``(1, 1, D, H, W)`` integer label maps, all of the same shape
            (e.g. from :func:`load_label_maps`).
        cfg: synthesis ranges (default :class:`SynthConfig`).
        seed: base seed.
        length: number of items per epoch.
        p_same_map: probability that both images come from the same label map
            (1 with a single map).

    Items are dicts ``{"moving": (1, D, H, W) float32, "fixed": (1, D, H, W) float32,
    "moving_labels": (1, D, H, W), "fixed_labels": (1, D, H, W), "pair": (2,) int64}``
    (labels keep the maps' dtype; ``pair`` holds the map indices ``(a, b)``).
    """

    def __init__(self, label_maps: Sequence[torch.Tensor], cfg: SynthConfig | None = None,
                 seed: int = 0, length: int = 1000, *, p_same_map: float = 0.5) -> None:
        maps = list(label_maps)
        if not maps:
            raise ValueError("SynthPairs needs at least one label map")
        shape = _check_labels(maps[0])
        for k, m in enumerate(maps):
            if _check_labels(m) != shape:
                raise ValueError(f"label map {k} has shape {tuple(m.shape)}, expected {(1, 1, *shape)}")
        if int(length) < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 0.0 <= float(p_same_map) <= 1.0:
            raise ValueError(f"p_same_map must be in [0, 1], got {p_same_map}")
        super().__init__(length, seed)
        self.label_maps = maps
        self.cfg = cfg if cfg is not None else SynthConfig()
        self.p_same_map = float(p_same_map)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.length <= int(index) < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index = int(index) % self.length
        g = self.generator(index)
        n = len(self.label_maps)
        a = int(torch.randint(n, (), generator=g))
        same = float(torch.rand((), generator=g, dtype=torch.float64)) < self.p_same_map
        if same or n == 1:
            b = a
        else:
            b = int(torch.randint(n - 1, (), generator=g))
            b += int(b >= a)
        strip = float(torch.rand((), generator=g, dtype=torch.float64)) < self.cfg.p_skull_strip
        with torch.no_grad():
            ml = deform_labels(self.label_maps[a], g, self.cfg)
            m, ml = synthesise_image(ml, g, self.cfg, strip=strip)
            fl = deform_labels(self.label_maps[b], g, self.cfg)
            f, fl = synthesise_image(fl, g, self.cfg, strip=strip)
        return {"moving": m[0], "fixed": f[0], "moving_labels": ml[0], "fixed_labels": fl[0],
                "pair": torch.tensor([a, b])}


# --------------------------------------------------------------------------- loading


def load_label_maps(paths: Sequence[str | os.PathLike[str]], shape: Sequence[int]) -> list[torch.Tensor]:
    """Read label maps and bring each onto a working grid of ``shape`` (nearest neighbour).

    Each map's grid is ``grid.canonical().working_grid(shape=shape)`` (as :func:`avsm.api.working_grid_for`):
    its canonical orientation (tensor axes ≈ S-I, A-P, L-R) over the same
    physical box (first and last voxel centres kept), so unit coordinates mean
    the same place before and after.  Values are resampled with
    :func:`avsm.io.image.resample` (nearest neighbour: no label is invented, but
    structures thinner than the new spacing may vanish).

    Args:
        paths: label map files (anything :func:`avsm.io.image.load_image` reads).
        shape: working shape ``(D, H, W)`` in voxels.

    Returns:
        One ``(1, 1, D, H, W)`` int64 tensor per path.

    Raises:
        AvsmError: a file cannot be read or is not a label map.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 sizes >= 2, got {shape}")
    out: list[torch.Tensor] = []
    for p in paths:
        vol = load_image(p, label=True)
        grid = vol.grid.canonical().working_grid(shape=tuple(shape))
        res = resample(vol, grid, interpolation="nearest")
        arr = np.ascontiguousarray(res.array).astype(np.int64)
        out.append(torch.from_numpy(arr)[None, None])
        log.debug("label map %s: %s -> %s voxels, spacing %s mm", os.fspath(p), vol.grid.shape, shape,
                  tuple(round(s, 3) for s in grid.spacing))
    return out
