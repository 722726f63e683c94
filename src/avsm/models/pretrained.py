"""Pretrained AVSM models bundled with the package (never downloaded).

``load_pretrained()`` returns the bundled brain model
(``avsm/data/weights/avsm_brain.pt``, see ``MODEL_CARD.md`` next to it: T1 heads and brains,
trained on the IXI cohort); ``load_pretrained("brain-templates")`` the previous one (two MNI
templates, ``MODEL_CARD_templates.md``);
``load_pretrained("path/to/file.pt")`` reads any weights file or training
checkpoint written by :mod:`avsm.train`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from avsm.errors import AvsmError
from avsm.models.avsm import AVSM

#: Bundled models: name -> file in ``avsm/data/weights``.
BUNDLED: dict[str, str] = {"brain": "avsm_brain.pt", "brain-templates": "avsm_brain_templates.pt"}
DEFAULT = "brain"


def bundled_path(name: str = DEFAULT) -> Path:
    """Path of a bundled weights file.

    Raises:
        AvsmError: unknown name, or the file is not installed.
    """
    if name not in BUNDLED:
        raise AvsmError(f"unknown pretrained model {name!r}; bundled: {', '.join(sorted(BUNDLED))}")
    p = Path(str(resources.files("avsm.data").joinpath("weights", BUNDLED[name])))
    if not p.is_file():
        raise AvsmError(f"the bundled model {name!r} is not installed (expected {p}); "
                        "pass a weights file or train one with `avsm train`")
    return p


def load_pretrained(name_or_path: str | None = None, device: torch.device | str = "cpu") -> AVSM:
    """Load a pretrained :class:`AVSM` in eval mode.

    Args:
        name_or_path: ``None`` (the bundled default), a bundled name (``brain``),
            or a path to a weights file / training checkpoint.
        device: where to put the model.

    Returns:
        The model, ``eval()``, affine part frozen, parameters without gradients.

    Raises:
        AvsmError: missing or unreadable file, or not an avsm model.
    """
    from avsm.train.trainer import load_model_file

    if name_or_path is None or name_or_path in BUNDLED:
        path = bundled_path(name_or_path or DEFAULT)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise AvsmError("pretrained model file not found", path)
    model = load_model_file(path, map_location="cpu")
    model.freeze_affine(True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()
