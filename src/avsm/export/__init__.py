"""Export of registrations to other tools (ITK/ANTs transforms, Learn2Reg) and import of theirs.

See :mod:`avsm.export.itk` for the conventions (pull-back, LPS mm, ANTs list order).
"""

from avsm.export.itk import (
    FORMATS,
    ROLES,
    export_fields,
    l2r_displacement,
    load_transform,
    parse_transform_spec,
    transform_paths_for_prefix,
    world_affine,
    world_points_to_displacement,
    write_transforms,
)

__all__ = [
    "FORMATS",
    "ROLES",
    "export_fields",
    "l2r_displacement",
    "load_transform",
    "parse_transform_spec",
    "transform_paths_for_prefix",
    "world_affine",
    "world_points_to_displacement",
    "write_transforms",
]
