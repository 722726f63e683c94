"""One typed, validated settings object for a registration, with presets by name.

Every option of ``avsm register`` (and of :func:`avsm.register`) lives here and
travels as one object from the CLI through the pipeline to the core:

* :class:`RegistrationSettings`: method, initialisation, similarity, working
  grid, device, and the settings of each stage (:class:`AffineOptConfig`,
  :class:`VSVFOptConfig` for ``opt`` and for the refinement of ``net+opt``,
  :class:`NetworkSettings`);
* :func:`preset` builds the settings of a named preset (``fast``, the default;
  ``paper``, the CVPR 2019 schedule); :meth:`RegistrationSettings.replace`
  overrides fields with validation.

Example::

    from avsm.settings import preset
    s = preset("paper").replace(device="cuda")
    result = avsm.register(fixed=f, moving=m, settings=s)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from avsm.errors import AvsmError
from avsm.optim.affine_opt import AffineOptConfig
from avsm.optim.vsvf_opt import VSVFOptConfig

__all__ = ["METHODS", "TRANSFORMS", "INIT_MODES", "PRESETS", "NetworkSettings", "RegistrationSettings", "preset"]

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
        method: ``auto`` (default: ``net+opt`` for inputs like the bundled network's
            training data, head-sized MR volumes, else ``opt``; see
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
        spacing: working-grid spacing (mm); ``None``: 2 mm (never finer than the
            image) for optimisation, the model's own for the network.
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
    spacing: float | None = None
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
        if self.spacing is not None and not self.spacing > 0:
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


#: preset name -> one-line description
PRESETS = {
    "fast": "default: affine-opt 80/30 Adam iterations at 1/4 and 1/2 resolution (early stop), vSVF-opt by "
            "scaling and squaring with half-width kernels, L-BFGS without line search 80/60 iterations at 1/4 "
            "and 1/2 resolution, none at full resolution (as antspyx 'SyN')",
    "paper": "the CVPR 2019 schedule: affine-opt 200/200/50 Adam, vSVF-opt 60/60/60 L-BFGS (strong Wolfe), "
             "RK4 with 10 steps",
}


def preset(name: str, **changes: Any) -> RegistrationSettings:
    """Settings of a named preset (see :data:`PRESETS`), with optional field overrides."""
    if name == "fast":
        base = RegistrationSettings(preset="fast")
    elif name == "paper":
        base = RegistrationSettings(preset="paper", affine=AffineOptConfig(), linear=AffineOptConfig(),
                                    vsvf=VSVFOptConfig(), refine=_paper_refine())
    else:
        raise AvsmError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return base.replace(**changes) if changes else base
