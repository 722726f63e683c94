"""elastix baseline: affine then cubic B-spline, through the ``elastix`` / ``transformix`` command line.

Install the command line tools (Debian/Ubuntu: ``apt-get install elastix``,
105 MB; elastix 5.0.1 there).  The Python package ``itk-elastix`` is not used:
it adds 1.6 GB, takes ~13 s to import, and its 0.25.4 build segfaults with its
own default B-spline map (see ``../shared/design/peer-tools-notes.md``).

Parameter maps (written by :func:`parameter_maps`), close to elastix's
defaults and to the model-zoo brain settings:

* affine: ``AdvancedMattesMutualInformation`` (32 bins), adaptive stochastic
  gradient descent, 4 resolutions (smoothing pyramid), 256 iterations each,
  2048 random samples, geometrical-centre initialisation;
* step sizes estimated automatically (``DisplacementDistribution``, 4096
  samples for the exact gradient: the default 100 000 made the estimation
  dominate the run time);
* B-spline: the same metric plus ``TransformBendingEnergyPenalty`` (weight
  0.01 relative to the metric, i.e. ``Metric1Weight``), final control-point
  grid 10 mm, 4 resolutions, 500 iterations each.

Conversion: ``transformix -def all`` gives the dense *displacement* of the full
chain (affine included) on the fixed working grid, in ITK's LPS world mm,
written as MetaImage (no NIfTI orientation ambiguity); the affine stage is read
from ``TransformParameters.0.txt`` (``T(x) = A (x − c) + t + c``, LPS).  No
inverse is given.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from avsm.baselines._convert import displacement_from_sitk
from avsm.baselines.base import FieldResult, MethodUnavailable, WorldTransform, run_tool, tool_threads, working_inputs
from avsm.io.image import Volume

__all__ = ["elastix", "parameter_maps", "read_affine_parameters"]

log = logging.getLogger(__name__)

_COMMON = {
    "FixedInternalImagePixelType": "float",
    "MovingInternalImagePixelType": "float",
    "FixedImageDimension": 3,
    "MovingImageDimension": 3,
    "UseDirectionCosines": "true",
    "Registration": "MultiResolutionRegistration",
    "Interpolator": "BSplineInterpolator",
    "ResampleInterpolator": "FinalBSplineInterpolator",
    "Resampler": "DefaultResampler",
    "FixedImagePyramid": "FixedSmoothingImagePyramid",
    "MovingImagePyramid": "MovingSmoothingImagePyramid",
    "Optimizer": "AdaptiveStochasticGradientDescent",
    "Metric": "AdvancedMattesMutualInformation",
    "NumberOfHistogramBins": 32,
    "NumberOfResolutions": 4,
    "ImageSampler": "RandomCoordinate",
    "NumberOfSpatialSamples": 2048,
    "NewSamplesEveryIteration": "true",
    "BSplineInterpolationOrder": 1,
    "FinalBSplineInterpolationOrder": 1,  # the result image is only used to check the conversion
    "DefaultPixelValue": 0,
    "HowToCombineTransforms": "Compose",
    "ResultImageFormat": "nii",
    "ResultImagePixelType": "float",
    "WriteResultImage": "false",
    "AutomaticParameterEstimation": "true",
    # the default exact-gradient sample count (100 000) made the step-size estimation of the
    # B-spline + bending-energy stage take ~9 s per resolution at 4 mm; 4096 samples: 0.3 s
    "ASGDParameterEstimationMethod": "DisplacementDistribution",
    "NumberOfSamplesForExactGradient": 4096,
    "RandomSeed": 121212,
}


def parameter_maps(*, grid_spacing_mm: float = 10.0, bending_weight: float = 0.01,
                   affine_iterations: int = 256, bspline_iterations: int = 500) -> tuple[dict[str, Any], dict[str, Any]]:
    """The affine and B-spline parameter maps (dicts of elastix parameters)."""
    affine = {**_COMMON, "Transform": "AffineTransform", "AutomaticScalesEstimation": "true",
              "AutomaticTransformInitialization": "true",
              "AutomaticTransformInitializationMethod": "GeometricalCenter",
              "MaximumNumberOfIterations": int(affine_iterations)}
    bspline = {**_COMMON, "Registration": "MultiMetricMultiResolutionRegistration",
               "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
               "Metric0Weight": 1.0, "Metric1Weight": float(bending_weight),
               "Transform": "BSplineTransform", "FinalGridSpacingInPhysicalUnits": float(grid_spacing_mm),
               "GridSpacingSchedule": [8.0, 4.0, 2.0, 1.0],
               "MaximumNumberOfIterations": int(bspline_iterations), "WriteResultImage": "true"}
    return affine, bspline


def _format(value: Any) -> str:
    vals = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in vals:
        if isinstance(v, str):
            out.append(f'"{v}"')
        elif isinstance(v, bool):
            out.append(f'"{str(v).lower()}"')
        else:
            out.append(repr(v) if isinstance(v, float) else str(v))
    return " ".join(out)


def write_parameter_file(params: dict[str, Any], path: Path) -> None:
    """Write an elastix parameter map in its text format ``(Key value ...)``."""
    path.write_text("".join(f"({k} {_format(v)})\n" for k, v in params.items()))


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise MethodUnavailable(f"elastix: `{name}` not on PATH (Debian/Ubuntu: apt-get install elastix)")
    return found




def _numbers(text: str, key: str) -> list[float]:
    m = re.search(rf"^\({key}\s+([^)]*)\)", text, flags=re.MULTILINE)
    if not m:
        raise RuntimeError(f"elastix transform file has no {key}")
    return [float(v) for v in m.group(1).replace('"', " ").split()]


def read_affine_parameters(path: Path) -> np.ndarray:
    """``(4, 4)`` LPS world matrix of an elastix ``AffineTransform`` parameter file.

    elastix stores the 9 matrix entries (row-major) then the translation, about
    ``CenterOfRotationPoint``: ``T(x) = A (x − c) + t + c``.
    """
    text = Path(path).read_text()
    p = _numbers(text, "TransformParameters")
    c = np.array(_numbers(text, "CenterOfRotationPoint"))
    if len(p) != 12 or c.shape != (3,):
        raise RuntimeError(f"{path}: not a 3-D affine transform")
    A = np.array(p[:9]).reshape(3, 3)
    t = np.array(p[9:])
    M = np.eye(4)
    M[:3, :3] = A
    M[:3, 3] = t + c - A @ c
    return M


def elastix(
    fixed: Volume,
    moving: Volume,
    *,
    spacing: float | None = 2.0,
    threads: int | None = None,
    grid_spacing_mm: float = 10.0,
    bending_weight: float = 0.01,
    affine_iterations: int = 256,
    bspline_iterations: int = 500,
    keep_warped: bool = False,
    **_: Any,
) -> FieldResult:
    """elastix affine + B-spline on the working pair.

    Args:
        fixed, moving: intensity volumes (any geometry).
        spacing: working-grid spacing in mm.
        threads: ``-threads`` (default ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` or 2).
        grid_spacing_mm: final B-spline control-point spacing.
        bending_weight: weight of the bending-energy penalty.
        affine_iterations, bspline_iterations: iterations per resolution of each stage.
        keep_warped: keep elastix's own warped image in ``info['tool_warped']`` (fixed working grid).

    Returns:
        :class:`FieldResult` without inverse.
    """
    ex, tx = _tool("elastix"), _tool("transformix")
    n_thr = tool_threads(threads)
    t0 = time.perf_counter()
    fw, mw = working_inputs(fixed, moving, spacing)
    timings = {"prepare": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory(prefix="avsm-elastix-") as tmp:
        d = Path(tmp)
        sitk.WriteImage(sitk.Cast(fw.to_sitk(), sitk.sitkFloat32), str(d / "fixed.mha"))
        sitk.WriteImage(sitk.Cast(mw.to_sitk(), sitk.sitkFloat32), str(d / "moving.mha"))
        aff, bsp = parameter_maps(grid_spacing_mm=grid_spacing_mm, bending_weight=bending_weight,
                                  affine_iterations=affine_iterations, bspline_iterations=bspline_iterations)
        write_parameter_file(aff, d / "affine.txt")
        write_parameter_file(bsp, d / "bspline.txt")
        (d / "out").mkdir()
        t1 = time.perf_counter()
        run_tool([ex, "-f", "fixed.mha", "-m", "moving.mha", "-p", "affine.txt", "-p", "bspline.txt",
              "-out", "out", "-threads", str(n_thr)], tmp)
        timings["elastix"] = time.perf_counter() - t1
        tp1 = d / "out" / "TransformParameters.1.txt"
        # the deformation as MetaImage (LPS, unambiguous), written next to the transform file
        text = tp1.read_text()
        text = re.sub(r'\(ResultImageFormat "[^"]*"\)', '(ResultImageFormat "mha")', text)
        tp1.write_text(text)
        (d / "def").mkdir()
        run_tool([tx, "-def", "all", "-tp", str(tp1), "-out", "def", "-threads", str(n_thr)], tmp)
        grid, dfield = displacement_from_sitk(sitk.ReadImage(str(d / "def" / "deformationField.mha")))
        A = read_affine_parameters(d / "out" / "TransformParameters.0.txt")
        info: dict[str, Any] = {"grid_spacing_mm": grid_spacing_mm, "bending_weight": bending_weight,
                                "iterations": [affine_iterations, bspline_iterations]}
        if keep_warped:
            res = next((d / "out").glob("result.1.*"))
            info["tool_warped"] = Volume(sitk.GetArrayFromImage(sitk.ReadImage(str(res))).astype(np.float32),
                                         fw.grid)
            info["fixed_work"], info["moving_work"] = fw, mw
    timings["total"] = time.perf_counter() - t0
    return FieldResult(fixed.grid, moving.grid, WorldTransform(affine=np.eye(4), field_grid=grid, field=dfield),
                       None, affine_forward=A, method="elastix", timings=timings, info=info)
