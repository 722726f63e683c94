"""One typed, validated settings object for a registration, with presets by name.

Every option of ``avsm register`` (and of :func:`avsm.register`) lives here and
travels as one object from the CLI through the pipeline to the core:

* :class:`RegistrationSettings`: method, initialisation, similarity, working
  grid, device, and the settings of each stage (:class:`AffineOptConfig`,
  :class:`VSVFOptConfig` for ``opt`` and for the refinement of ``net+opt``,
  :class:`NetworkSettings`);
* :func:`preset` builds the settings of a named preset (:data:`PRESETS`; ``native``,
  :data:`DEFAULT_PRESET`, is the default of ``avsm register`` and :func:`avsm.register`; the
  fields' own defaults are the ``fast`` preset's); :meth:`RegistrationSettings.replace` overrides fields with
  validation; :func:`describe_preset` says what a preset's stages run, read from
  its settings (the presets listed at the end of this docstring, in
  ``avsm register --help`` and in the README are generated from it).

Example::

    from avsm.settings import preset
    s = preset("paper").replace(device="cuda")
    result = avsm.register(fixed=f, moving=m, settings=s)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

from avsm.errors import AvsmError
from avsm.optim.affine_opt import AffineOptConfig
from avsm.optim.vsvf_opt import VSVFOptConfig

C = TypeVar("C", AffineOptConfig, VSVFOptConfig)

__all__ = ["METHODS", "TRANSFORMS", "INIT_MODES", "PRESETS", "PRESET_PURPOSES", "NetworkSettings",
           "RegistrationSettings", "describe_preset", "preset"]

#: registration methods
METHODS = ("auto", "affine", "opt", "net", "net+opt")
#: initialisation modes (anything else is read as a transform file)
INIT_MODES = ("auto", "header", "com", "moments")
#: transform models (``deformable`` = affine + vSVF)
TRANSFORMS = ("rigid", "affine", "deformable")
#: intensity models of the inputs
MODALITIES = ("auto", "mr", "ct")
#: similarity names accepted by ``--similarity``
SIMILARITIES = ("lncc", "ncc", "mse", "mi")


#: where the network methods' affine comes from (:attr:`NetworkSettings.affine`)
NETWORK_AFFINE = ("network", "opt")


@dataclass
class NetworkSettings:
    """The AVSM network: weights and test-time steps.

    Attributes:
        model: weights file, or ``None`` for the bundled model.
        affine_steps: affine test-time steps (``None``: the model's, 7).
        vsvf_steps: vSVF test-time steps (``None``: the model's).
        affine: where the affine comes from: ``network`` (the multi-step affine network
            from the initialisation, the paper's AVSM) or ``opt`` (affine-opt from the
            initialisation, :attr:`RegistrationSettings.affine`; the network then runs its
            vSVF steps only).
    """

    model: str | None = None
    affine_steps: int | None = None
    vsvf_steps: int | None = None
    affine: str = "network"

    def __post_init__(self) -> None:
        for name in ("affine_steps", "vsvf_steps"):
            v = getattr(self, name)
            if v is not None and int(v) < 0:
                raise AvsmError(f"{name} must be >= 0, got {v}")
        if self.affine not in NETWORK_AFFINE:
            raise AvsmError(f"network affine must be one of {', '.join(NETWORK_AFFINE)}, got {self.affine!r}")


#: the fast preset's kernel: the paper's five Gaussians at half the width (chosen on OASIS
#: development pairs, benchmarks/bench_opt_schedules.py: +0.015 mean Dice, no folds)
FAST_SIGMAS = (0.025, 0.05, 0.075, 0.1, 0.125)


#: the native preset's kernel: σ from 1 % to 8 % of the field of view (about 2.5–20 mm on a brain),
#: chosen on OASIS-TRT-20 development pairs at 1 mm (``benchmarks/tune_native.py``)
NATIVE_SIGMAS = (0.01, 0.02, 0.04, 0.08)
#: the native preset's mk-LNCC windows (voxels of each pyramid level, dense): 5 and 9, as ANTs' CC
#: radius 2 and 4
NATIVE_WINDOWS = (5, 9)
#: the preset of ``avsm register`` and :func:`avsm.register` when none is named
DEFAULT_PRESET = "native"
#: the finest working spacing of ``spacing="native"`` (mm): images finer than this are registered at it
NATIVE_FLOOR_MM = 1.0


def at_spacing(config: C, spacing_mm: float) -> C:
    """A stage config of the native preset on a working grid of ``spacing_mm``.

    The native preset's levels are physical: written for a :data:`NATIVE_FLOOR_MM` grid (1/4 and
    1/2 of a 1 mm grid are 4 and 2 mm), so on a coarser image the same millimetre levels are
    used, never finer than the image: each scale becomes ``min(1, scale · spacing / floor)``
    (a 2.5 mm image: levels at 4 and 2.5 mm).  On a 1 mm grid the config is returned unchanged.
    """
    f = float(spacing_mm) / NATIVE_FLOOR_MM
    if f <= 1.0:
        return config
    return dataclasses.replace(config, scales=tuple(min(1.0, s * f) for s in config.scales))


def _native_affine() -> AffineOptConfig:
    return AffineOptConfig(scales=(0.25, 0.5), iterations=(80, 30), lr=1e-2, tol=1e-4, window=10)


def _native_linear() -> AffineOptConfig:
    # the fast preset's physical levels (1/4, 1/2, 1 of 2 mm) on a 1 mm working grid
    return AffineOptConfig(scales=(0.125, 0.25, 0.5), iterations=(80, 40, 40), lr=5e-3)


def _native_vsvf() -> VSVFOptConfig:
    return VSVFOptConfig(scales=(0.25, 0.5), iterations=(60, 40), integrator="ss", squarings=7,
                         sigmas=NATIVE_SIGMAS, lncc_windows=NATIVE_WINDOWS, optimizer="lbfgs-nols", lr=0.5)


def _native_refine() -> VSVFOptConfig:
    # net+opt: the network replaces the 4 mm level; the refinement is the native preset's 2 mm level
    return VSVFOptConfig(scales=(0.5,), iterations=(40,), integrator="ss", squarings=7,
                         sigmas=NATIVE_SIGMAS, lncc_windows=NATIVE_WINDOWS, optimizer="lbfgs-nols", lr=0.5)


def _fast_affine() -> AffineOptConfig:
    return AffineOptConfig(scales=(0.25, 0.5), iterations=(80, 30), lr=1e-2, tol=1e-4, window=10)


def _fast_linear() -> AffineOptConfig:
    return AffineOptConfig(scales=(0.25, 0.5, 1.0), iterations=(80, 40, 40), lr=5e-3)


def _fast_vsvf() -> VSVFOptConfig:
    return VSVFOptConfig(scales=(0.25, 0.5, 1.0), iterations=(80, 60, 0), integrator="ss", squarings=7,
                         sigmas=FAST_SIGMAS, optimizer="lbfgs-nols", lr=0.5)


def _fast_refine() -> VSVFOptConfig:
    return VSVFOptConfig(scales=(1.0,), iterations=(40,), integrator="ss", squarings=7, sigmas=FAST_SIGMAS,
                         optimizer="lbfgs-nols", lr=0.5)


def _paper_refine() -> VSVFOptConfig:
    return VSVFOptConfig(scales=(1.0,), iterations=(20,))


@dataclass
class RegistrationSettings:
    """Everything that decides how a pair is registered (outputs are the pipeline's).

    Attributes:
        method: ``auto`` (default: runs ``opt`` on every input, the most accurate method
            within ANTs SyN's time on real cross-subject brains; the choice is logged, see
            :func:`avsm.api.choose_method`), ``opt`` (affine-opt + vSVF-opt), ``affine``,
            ``net`` (AVSM network) or ``net+opt`` (network, then vSVF-opt refinement).
        preset: the name of the preset the stage settings came from (informational).
        transform: ``deformable`` (affine + vSVF, default), ``affine`` or ``rigid`` (the
            linear stage alone, with the ``linear`` settings; rigid is a rotation and a
            translation in millimetres).
        init: initial transform before the affine stage: ``auto``, ``header``,
            ``com``, ``moments``, or the path of an ANTs/ITK affine transform file.
        modality: ``auto`` (detect per image from the intensities), ``mr`` or ``ct``: CT is
            windowed in Hounsfield units (``ct_window`` → [0, 1]; air and padding → 0) and
            keeps thick-slice spacing on the working grid, MR uses 0.1/99.9 percentiles.
        ct_window: the Hounsfield window of CT inputs.
        similarity: overrides the similarity of every stage (``lncc``, ``ncc``,
            ``mse``, ``mi``); ``None`` keeps each stage's own (mk-LNCC by default).
        spacing: working-grid spacing (mm); ``"native"``: the fixed image's own finest
            spacing, never finer than :data:`NATIVE_FLOOR_MM` (the ``native`` preset); ``None``:
            2 mm (never finer than the image) for optimisation, the model's own for the network.
        shape: explicit working-grid shape (D, H, W) instead of ``spacing``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        affine: affine-opt settings when a vSVF stage follows.
        linear: affine-opt settings when the linear stage is the result (``--transform
            rigid|affine``, ``--method affine``): it also runs at full resolution.
        vsvf: vSVF-opt settings of ``opt``.
        refine: vSVF-opt settings of the refinement in ``net+opt``.
        network: network weights and steps.
    """

    method: str = "auto"
    preset: str = "fast"
    transform: str = "deformable"
    init: str = "auto"
    modality: str = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    similarity: str | None = None
    spacing: float | str | None = None
    shape: tuple[int, int, int] | None = None
    device: str = "cpu"
    affine: AffineOptConfig = field(default_factory=_fast_affine)
    linear: AffineOptConfig = field(default_factory=_fast_linear)
    vsvf: VSVFOptConfig = field(default_factory=_fast_vsvf)
    refine: VSVFOptConfig = field(default_factory=_fast_refine)
    network: NetworkSettings = field(default_factory=NetworkSettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AvsmError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.transform not in TRANSFORMS:
            raise AvsmError(f"unknown transform {self.transform!r}; choose one of {', '.join(TRANSFORMS)}")
        if self.transform != "deformable" and self.method in ("net", "net+opt"):
            raise AvsmError(f"the network registers deformably; use --method opt with --transform {self.transform}")
        if self.init not in INIT_MODES and not os.path.exists(self.init):
            raise AvsmError(f"--init is neither one of {', '.join(INIT_MODES)} nor an existing transform file",
                            self.init)
        if self.modality not in MODALITIES:
            raise AvsmError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        self.ct_window = (float(self.ct_window[0]), float(self.ct_window[1]))
        if not self.ct_window[1] > self.ct_window[0]:
            raise AvsmError(f"the CT window must be (low, high) with high > low, got {self.ct_window}")
        if self.similarity is not None:
            if self.similarity not in SIMILARITIES:
                raise AvsmError(f"unknown similarity {self.similarity!r}; choose one of {', '.join(SIMILARITIES)}")
            # copies: the caller's stage configs are not changed behind its back
            for name in ("affine", "linear", "vsvf", "refine"):
                setattr(self, name, dataclasses.replace(getattr(self, name), similarity=self.similarity))
        if isinstance(self.spacing, str) and self.spacing != "native":
            try:
                self.spacing = float(self.spacing)
            except ValueError:
                raise AvsmError(f"spacing must be a number of mm or 'native', got {self.spacing!r}") from None
        if isinstance(self.spacing, (int, float)) and not self.spacing > 0:
            raise AvsmError(f"spacing must be > 0 mm, got {self.spacing}")
        if self.shape is not None:
            self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
            if len(self.shape) != 3 or min(self.shape) < 4:
                raise AvsmError(f"shape must be three sizes >= 4, got {self.shape}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise AvsmError(f"device must be cpu or cuda[:N], got {self.device!r}")

    def replace(self, **changes: Any) -> RegistrationSettings:
        """A validated copy with some fields changed (stage configs are copied, not shared)."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("affine", "linear", "vsvf", "refine", "network"):
            base[k] = dataclasses.replace(base[k])
        unknown = set(changes) - set(base)
        if unknown:
            raise AvsmError(f"unknown registration setting(s): {', '.join(sorted(unknown))}")
        base.update(changes)
        return RegistrationSettings(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for ``summary.json`` and batch option fingerprints)."""
        return dataclasses.asdict(self)


#: preset name -> what it is for, in words and without numbers.  To add a preset, add it here and
#: in :func:`preset`; :data:`PRESETS`, the ``avsm register --help`` text and the docstrings then
#: describe its stages from its settings (:func:`describe_preset`), so no number is written twice.
PRESET_PURPOSES = {
    "native": "the default: registration on the image's own grid (1 mm brains at 1 mm), levels at 1/4 and 1/2 of "
              "it, small kernels and ANTs-sized mk-LNCC windows: more accurate than ANTs SyN in less than half "
              "its time on 1 mm brains (README)",
    "fast": "the previous default: a 2 mm working grid whatever the image (faster than native; less accurate on "
            "1 mm images, README)",
    "paper": "the CVPR 2019 schedule (Table 1 of the paper)",
}


def preset(name: str, **changes: Any) -> RegistrationSettings:
    """Settings of a named preset (see :data:`PRESETS`), with optional field overrides."""
    if name == "fast":
        base = RegistrationSettings(preset="fast")
    elif name == "native":
        base = RegistrationSettings(preset="native", spacing="native", affine=_native_affine(),
                                    linear=_native_linear(), vsvf=_native_vsvf(), refine=_native_refine())
    elif name == "paper":
        base = RegistrationSettings(preset="paper", affine=AffineOptConfig(), linear=AffineOptConfig(),
                                    vsvf=VSVFOptConfig(), refine=_paper_refine())
    else:
        raise AvsmError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_PURPOSES)}")
    return base.replace(**changes) if changes else base


_OPTIMIZER_NAMES = {"lbfgs": "L-BFGS (strong Wolfe line search)", "lbfgs-nols": "L-BFGS without line search",
                    "adam": "Adam"}


def _level(scale: float) -> str:
    """A pyramid level as a fraction of the working grid: ``0.25`` -> ``1/4``, ``1.0`` -> ``1``."""
    f = Fraction(scale).limit_denominator(1024)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _schedule(iterations: tuple[int, ...], scales: tuple[float, ...]) -> str:
    return f"{'/'.join(str(i) for i in iterations)} iterations at {', '.join(_level(s) for s in scales)}"


def _affine_text(c: AffineOptConfig) -> str:
    return f"Adam {_schedule(c.iterations, c.scales)}" + (" (early stop)" if c.tol > 0 else "")


def _vsvf_method(c: VSVFOptConfig) -> str:
    integrator = (f"scaling and squaring ({c.squarings} squarings)" if c.integrator == "ss"
                  else f"{c.integrator.upper()} with {c.time_steps} steps")
    windows = (f"mk-LNCC windows {', '.join(str(k) for k in c.lncc_windows)} voxels" if c.lncc_windows
               else "the paper's mk-LNCC windows")
    return f"{integrator}, kernel σ {min(c.sigmas):g}–{max(c.sigmas):g}, {windows}"


def _vsvf_text(c: VSVFOptConfig, like: VSVFOptConfig | None = None) -> str:
    text = _schedule(c.iterations, c.scales) + (" (early stop)" if c.tol > 0 else "")
    if like is not None and (c.optimizer, _vsvf_method(c)) == (like.optimizer, _vsvf_method(like)):
        return text + ", otherwise as vSVF-opt"
    return f"{_OPTIMIZER_NAMES.get(c.optimizer, c.optimizer)} {text}, {_vsvf_method(c)}"


def describe_preset(name: str) -> str:
    """One line saying what each stage of preset ``name`` runs, read from :func:`preset`'s settings.

    The ``avsm register --help`` text, :data:`PRESETS` and the docstrings are built from it, so
    their iteration counts are the ones the preset runs (``tests/test_cli_help.py``).  Levels are
    fractions of the working grid (``1/4``, ``1/2``, ``1``).
    """
    s = preset(name)
    grid = (f"working grid: the image's own spacing (at least {NATIVE_FLOOR_MM:g} mm)" if s.spacing == "native"
            else "working grid: 2 mm (the image's if coarser)")
    return (f"{grid}; affine-opt: {_affine_text(s.affine)}; "
            f"vSVF-opt: {_vsvf_text(s.vsvf)}; "
            f"net+opt refinement: {_vsvf_text(s.refine, like=s.vsvf)}; "
            f"linear only (--transform rigid/affine): {_affine_text(s.linear)}")


#: preset name -> one-line description: its purpose, then :func:`describe_preset`
PRESETS = {name: f"{purpose}. {describe_preset(name)}" for name, purpose in PRESET_PURPOSES.items()}


def presets_doc() -> str:
    """The presets as a reST bullet list (appended to this module's and :func:`preset`'s docstrings)."""
    return "Presets (generated from the settings by :func:`describe_preset`):\n\n" + "\n".join(
        f"* ``{name}``: {text}" for name, text in PRESETS.items()) + "\n"


def presets_markdown() -> str:
    """The README's preset table (``python -c "import avsm.settings as s; print(s.presets_markdown())"``)."""
    rows = ["| preset | when | what it runs (levels: fractions of the working grid) |", "|---|---|---|"]
    rows += [f"| `{name}` | {purpose} | {describe_preset(name)} |" for name, purpose in PRESET_PURPOSES.items()]
    return "\n".join(rows)


if __doc__ is not None:  # not under python -OO
    __doc__ += "\n" + presets_doc()
if preset.__doc__ is not None:
    preset.__doc__ += "\n\n" + presets_doc()
