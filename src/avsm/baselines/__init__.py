"""Registration methods behind one interface: avsm's own and peer baselines (ANTs, SimpleITK demons).

See :mod:`avsm.baselines.base`.  Optional packages (antspyx) are imported only
when their method is requested.
"""

from avsm.baselines.base import (
    REGISTRY,
    FieldResult,
    MethodUnavailable,
    WorldTransform,
    available_methods,
    get_method,
    register_method,
    run_method,
    working_inputs,
)

__all__ = [
    "REGISTRY",
    "FieldResult",
    "MethodUnavailable",
    "WorldTransform",
    "available_methods",
    "get_method",
    "register_method",
    "run_method",
    "working_inputs",
]
