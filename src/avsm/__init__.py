"""avsm: joint affine and vSVF 3-D image registration (Shen et al., CVPR 2019), networks and optimisation.

Coordinate convention: see :mod:`avsm.core.coords`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from avsm.api import RegistrationResult, register  # noqa: E402
from avsm.errors import AvsmError  # noqa: E402
from avsm.io.image import Volume, load_image, save_image  # noqa: E402
from avsm.io.masks import load_mask  # noqa: E402
from avsm.settings import RegistrationSettings, preset  # noqa: E402

__all__ = ["AvsmError", "RegistrationResult", "RegistrationSettings", "Volume", "__version__", "load_image",
           "load_mask", "preset", "register", "save_image"]
