"""avsm's own methods behind the baseline interface (:mod:`avsm.baselines.base`)."""

from __future__ import annotations

from typing import Any

from avsm.api import RegistrationResult, identity_result, register
from avsm.io.image import Volume

__all__ = ["identity", "affine", "opt", "opt_paper", "net", "net_opt"]


def identity(fixed: Volume, moving: Volume, **opts: Any) -> RegistrationResult:
    """No registration: the physical identity (header alignment)."""
    return identity_result(fixed, moving, spacing=opts.get("spacing") or 2.0)


def affine(fixed: Volume, moving: Volume, **opts: Any) -> RegistrationResult:
    """avsm affine optimisation alone (``register(method='affine')``)."""
    return register(fixed=fixed, moving=moving, method="affine", progress=False, **opts)


def opt(fixed: Volume, moving: Volume, **opts: Any) -> RegistrationResult:
    """avsm affine then vSVF optimisation (``register(method='opt')``)."""
    return register(fixed=fixed, moving=moving, method="opt", progress=False, **opts)


def opt_paper(fixed: Volume, moving: Volume, **opts: Any) -> RegistrationResult:
    """avsm ``opt`` with the CVPR 2019 schedule (``--preset paper``: RK4, 200/200/50 Adam, 60/60/60 L-BFGS)."""
    from avsm.settings import preset

    return register(fixed=fixed, moving=moving, settings=preset("paper", method="opt"), progress=False, **opts)


def net(fixed: Volume, moving: Volume, **opts: Any) -> RegistrationResult:
    """The pretrained AVSM network (``register(method='net')``; ``vsvf_steps``/``affine_steps`` accepted)."""
    return register(fixed=fixed, moving=moving, method="net", progress=False, **opts)


def net_opt(fixed: Volume, moving: Volume, **opts: Any) -> RegistrationResult:
    """The network followed by vSVF-opt refinement (``register(method='net+opt')``)."""
    return register(fixed=fixed, moving=moving, method="net+opt", progress=False, **opts)
