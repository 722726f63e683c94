"""Initial affine that does not depend on where the scanner put the image.

Registration starts from an affine ``(A0, b0)`` mapping fixed working unit
coordinates to moving working unit coordinates (a pull-back, see
:mod:`avsm.core.coords`).  Until now that was always the *physical identity*
given by the two headers.  That is right for images already in a common
space and wrong by any amount for images whose origin or direction is
arbitrary (a 300 mm offset between scanners, a rotated header, ...).  This
module proposes other starting points, all expressed as a world pull-back
``W`` (fixed world LPS mm → moving world LPS mm, homogeneous ``(4, 4)``):

``header``
    ``W = I``: today's behaviour, ``A0, b0`` from ``moving_w2u @ fixed_u2w``.
``com``
    A translation making the intensity centres of mass (world mm) coincide,
    like antsRegistration's ``--initial-moving-transform [f,m,1]``.
``moments``
    Centres of mass plus a rotation taking the principal axes of the fixed
    image's intensity distribution (second moments in world mm, so voxel
    anisotropy and oblique directions are handled) onto those of the moving
    image.  **Rigid: no scaling** (a scale from eigenvalue ratios would
    confuse shape with size between subjects).  Eigenvectors have arbitrary
    signs; the four *proper* rotations (determinant +1) consistent with the
    axis correspondence are candidates, resolved by the similarity measure.
    Improper (mirroring) candidates are never considered: a physical body is
    not mirrored between scans, a header flip with the voxels reordered to
    match is the same physical image (the world relation stays proper), and
    a brain is nearly left-right symmetric, so a mirror candidate would often
    score well and silently swap hemispheres.  When two eigenvalues of either
    image are nearly equal (relative gap below ``degenerate_gap``) their axis
    correspondence is ambiguous, and the swapped correspondence is added.
``file``
    An explicit world pull-back ``world_matrix`` (e.g. read by the api from an
    ANTs/ITK transform file), used as it is.
``auto``
    All of header, com and the moments variants (and, with
    ``rotation_search``, rotations of ±30°, ±60°, ±90° and 180° about each
    world axis through the centres of mass) are scored by a similarity loss
    between the fixed image and the warped moving image on small
    block-averaged copies (longest side about ``eval_size`` voxels; mk-LNCC
    by default, the registration's own loss; a global NCC picked the same
    candidates in the tests, with scores about three times closer together).
    Candidates whose overlap of foregrounds is below ``min_overlap`` score
    ``inf`` and lose.  Among the candidates within ``tie_tolerance``
    (absolute, loss units) of the best score, the first in the
    order header, com, moments (smallest rotation first), rotation search
    wins, so well-aligned inputs keep today's behaviour.

Everything is pure torch/numpy on the inputs' device (CPU or CUDA); the
module knows world geometry only through the two ``unit → world`` matrices,
so it does not depend on :mod:`avsm.io`.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avsm.core.coords import affine_map, homogeneous_to_centred
from avsm.core.sampling import warp
from avsm.losses.lncc import MKLNCC

log = logging.getLogger(__name__)

__all__ = [
    "INIT_MODES",
    "InitResult",
    "Moments",
    "image_moments",
    "initial_affine",
    "world_to_unit_affine",
]

#: Accepted values of ``mode``.  ``file`` needs ``world_matrix``.
INIT_MODES: tuple[str, ...] = ("auto", "header", "com", "moments", "file")

#: Angles (degrees) of the coarse rotation search, about each world axis.
SEARCH_ANGLES_DEG: tuple[float, ...] = (30.0, -30.0, 60.0, -60.0, 90.0, -90.0, 180.0)


@dataclass
class InitResult:
    """The chosen initial transform and how it was chosen.

    Attributes:
        A0: ``(1, 3, 3)`` float32, linear part of the centred affine, fixed
            working unit → moving working unit coordinates (inputs' device).
        b0: ``(1, 3)`` float32 translation in unit coordinates (inputs' device).
        chosen: name of the chosen candidate: ``header``, ``com``,
            ``moments`` / ``moments#k`` (k-th sign/axis variant, by increasing
            rotation angle), ``rot[<axis><angle>]`` (rotation search, axis
            ``x``/``y``/``z`` of the LPS world) or ``file``.
        scores: similarity loss of every evaluated candidate (lower is better;
            ``inf`` where the candidate leaves too little overlap).
        world: ``(4, 4)`` float64 pull-back of the chosen candidate, fixed
            world (LPS mm) → moving world (LPS mm).
        overlap: foreground overlap fraction of every evaluated candidate, in [0, 1].
        mode: the requested mode.
    """

    A0: torch.Tensor
    b0: torch.Tensor
    chosen: str
    scores: dict[str, float]
    world: np.ndarray
    overlap: dict[str, float] = field(default_factory=dict)
    mode: str = "auto"


@dataclass(frozen=True)
class Moments:
    """Intensity moments of an image in world coordinates.

    Attributes:
        mass: sum of intensities (arbitrary units; 0 for an empty image).
        centre: ``(3,)`` float64 intensity centre of mass, world LPS mm.
        cov: ``(3, 3)`` float64 intensity-weighted covariance, mm².
    """

    mass: float
    centre: np.ndarray
    cov: np.ndarray


def _unit_axis(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unit coordinates ``i / (n - 1)`` of an axis (``[0]`` for ``n = 1``)."""
    if n > 1:
        return torch.linspace(0.0, 1.0, n, dtype=dtype, device=device)
    return torch.zeros(1, dtype=dtype, device=device)


def image_moments(image: torch.Tensor, u2w: np.ndarray) -> Moments:
    """Centre of mass and covariance of an image's intensities, in world mm.

    Computed exactly from 1-D and 2-D marginal sums in unit coordinates and
    then mapped to the world (``x = L u + t`` gives ``mean_w = L mean_u + t``,
    ``cov_w = L cov_u Lᵀ``), so no coordinate array is built.  Negative
    intensities are clamped to 0.

    Args:
        image: ``(1, 1, D, H, W)`` or ``(D, H, W)`` intensities (background ≈ 0).
        u2w: ``(4, 4)`` unit coordinates → world (LPS mm) of the image's grid.

    Returns:
        The moments; ``mass == 0`` (centre and covariance zero) for an empty image.
    """
    img = image.reshape(image.shape[-3:]).float().clamp_min(0.0)
    dtype = torch.float32 if img.device.type == "mps" else torch.float64
    D, H, W = img.shape
    u0, u1, u2 = (_unit_axis(n, dtype, img.device) for n in (D, H, W))
    # one float32 reduction over a single axis (a few hundred terms), the rest in float64
    p01 = img.sum(2).to(dtype)  # (D, H)
    p02 = img.sum(1).to(dtype)  # (D, W)
    p12 = img.sum(0).to(dtype)  # (H, W)
    m0, m1, m2 = p01.sum(1), p01.sum(0), p02.sum(0)
    mass = float(m0.sum())
    L = np.asarray(u2w, dtype=np.float64)[:3, :3]
    t = np.asarray(u2w, dtype=np.float64)[:3, 3]
    if not mass > 0 or not math.isfinite(mass):
        return Moments(0.0, np.zeros(3), np.zeros((3, 3)))
    mean = torch.stack([(m0 * u0).sum(), (m1 * u1).sum(), (m2 * u2).sum()]) / mass
    second = torch.empty(3, 3, dtype=dtype, device=img.device)
    second[0, 0] = (m0 * u0 * u0).sum()
    second[1, 1] = (m1 * u1 * u1).sum()
    second[2, 2] = (m2 * u2 * u2).sum()
    second[0, 1] = second[1, 0] = u0 @ p01 @ u1
    second[0, 2] = second[2, 0] = u0 @ p02 @ u2
    second[1, 2] = second[2, 1] = u1 @ p12 @ u2
    mean_u = mean.double().cpu().numpy()
    cov_u = (second / mass).double().cpu().numpy() - np.outer(mean_u, mean_u)
    cov_u = 0.5 * (cov_u + cov_u.T)
    return Moments(mass, L @ mean_u + t, L @ cov_u @ L.T)


def world_to_unit_affine(
    world: np.ndarray, fixed_u2w: np.ndarray, moving_u2w: np.ndarray
) -> np.ndarray:
    """Unit-coordinate pull-back ``moving_w2u @ world @ fixed_u2w``, ``(4, 4)`` float64.

    ``world`` is the identity for the header candidate; the product is then
    formed without it, so the result is bit-identical to
    :func:`avsm.io.geometry.unit_affine_between`.
    """
    m_w2u = np.linalg.inv(np.asarray(moving_u2w, dtype=np.float64))
    f_u2w = np.asarray(fixed_u2w, dtype=np.float64)
    world = np.asarray(world, dtype=np.float64)
    if np.array_equal(world, np.eye(4)):
        return m_w2u @ f_u2w
    return m_w2u @ world @ f_u2w


def _rigid(R: np.ndarray, c_fixed: np.ndarray, c_moving: np.ndarray) -> np.ndarray:
    """World pull-back ``x -> R (x - c_fixed) + c_moving`` as ``(4, 4)``."""
    W = np.eye(4)
    W[:3, :3] = R
    W[:3, 3] = c_moving - R @ c_fixed
    return W


def _axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """``(3, 3)`` rotation by ``degrees`` about world axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def rotation_angle(R: np.ndarray) -> float:
    """Rotation angle of a ``(3, 3)`` rotation, radians in [0, π]."""
    return math.acos(float(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)))


def _sorted_eigh(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric ``(3, 3)``."""
    w, V = np.linalg.eigh(cov)
    order = np.argsort(w)
    return w[order], V[:, order]


def _moment_rotations(fixed: Moments, moving: Moments, degenerate_gap: float) -> list[np.ndarray]:
    """Proper rotations taking the fixed principal axes onto the moving ones.

    ``R = E_m P S E_fᵀ`` with ``S`` a diagonal sign matrix and ``P`` the axis
    correspondence (identity, plus swaps of adjacent near-degenerate
    eigenvalue pairs); only ``det R = +1`` is kept.  Sorted by rotation angle.
    """
    wf, Ef = _sorted_eigh(fixed.cov)
    wm, Em = _sorted_eigh(moving.cov)
    perms: list[tuple[int, int, int]] = [(0, 1, 2)]
    for k in range(2):
        gaps = []
        for w in (wf, wm):
            hi = max(abs(w[k + 1]), 1e-12)
            gaps.append((w[k + 1] - w[k]) / hi)
        if min(gaps) < degenerate_gap:
            p = [0, 1, 2]
            p[k], p[k + 1] = p[k + 1], p[k]
            perms.append(tuple(p))  # type: ignore[arg-type]
    out: list[np.ndarray] = []
    for perm in perms:
        P = np.eye(3)[:, list(perm)]
        for signs in itertools.product((1.0, -1.0), repeat=3):
            R = Em @ P @ np.diag(signs) @ Ef.T
            if np.linalg.det(R) > 0:
                out.append(R)
    out.sort(key=rotation_angle)
    return out


def _pool_factor(shape: tuple[int, ...], eval_size: int) -> int:
    """Integer block size bringing the longest side of ``shape`` to about ``eval_size``."""
    return max(1, int(round(max(shape) / max(int(eval_size), 1))))


def _pooled(image: torch.Tensor, u2w: np.ndarray, k: int) -> tuple[torch.Tensor, np.ndarray]:
    """Block-average ``image`` by ``k`` per axis and give the unit → world matrix of the result.

    Block ``j`` of an axis of ``N`` voxels averages voxels ``jk .. jk + k - 1``
    (a trailing remainder is dropped), so its centre is at index
    ``(k - 1)/2 + j k`` of the original grid.  The returned matrix accounts
    for that exactly, so no half-block shift is introduced.

    Args:
        image: ``(1, 1, D, H, W)`` float image.
        u2w: ``(4, 4)`` unit → world of ``image``'s grid.
        k: block size (1 returns the inputs).

    Returns:
        ``((1, 1, D', H', W')`` float32 image, ``(4, 4)`` float64 unit → world of its grid).
    """
    img = image.float()
    shape = tuple(int(n) for n in img.shape[2:])
    k = min(k, *shape)
    if k <= 1:
        return img, np.asarray(u2w, dtype=np.float64)
    small = F.avg_pool3d(img, kernel_size=k, stride=k)
    P = np.eye(4)
    for c, (n, m) in enumerate(zip(shape, small.shape[2:])):
        # u_orig = ((k - 1)/2 + u_small (m - 1) k) / (N - 1)
        den = max(n - 1, 1)
        P[c, c] = max(m - 1, 1) * k / den  # an axis of length 1 sits at u = 0 whatever the scale
        P[c, 3] = 0.5 * (k - 1) / den
    return small, np.asarray(u2w, dtype=np.float64) @ P


def _voxel_volume(u2w: np.ndarray, shape: tuple[int, ...]) -> float:
    """Volume of one voxel (mm³) of a grid of ``shape`` whose unit cube maps to the world by ``u2w``."""
    cells = float(np.prod([max(n - 1, 1) for n in shape]))
    return abs(float(np.linalg.det(np.asarray(u2w)[:3, :3]))) / cells


def _centred(
    world: np.ndarray, fixed_u2w: np.ndarray, moving_u2w: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred ``(A, b)`` (float64 CPU, ``(1, 3, 3)``, ``(1, 3)``) of a world pull-back between two grids."""
    M = world_to_unit_affine(world, fixed_u2w, moving_u2w)
    M = torch.as_tensor(M, dtype=torch.float64).unsqueeze(0)
    return homogeneous_to_centred(M)


class _Scorer:
    """Scores candidate world pull-backs on block-averaged copies of the two images.

    Args:
        fixed_t, moving_t: ``(1, 1, ...)`` working images (same device).
        fixed_u2w, moving_u2w: ``(4, 4)`` unit → world of their grids.
        similarity: a loss module, or ``None`` for mk-LNCC evaluated on all
            candidates as one batch.
        eval_size: longest side (voxels) of the copies.
        min_overlap: overlap fraction under which a candidate scores ``inf``.
    """

    def __init__(
        self,
        fixed_t: torch.Tensor,
        moving_t: torch.Tensor,
        fixed_u2w: np.ndarray,
        moving_u2w: np.ndarray,
        similarity: nn.Module | None,
        eval_size: int,
        min_overlap: float,
    ) -> None:
        kf = _pool_factor(tuple(fixed_t.shape[2:]), eval_size)
        km = _pool_factor(tuple(moving_t.shape[2:]), eval_size)
        self.fixed, self.fixed_u2w = _pooled(fixed_t, fixed_u2w, kf)
        self.moving, self.moving_u2w = _pooled(moving_t, moving_u2w, km)
        self.similarity = similarity
        self.min_overlap = min_overlap
        self.shape = tuple(int(n) for n in self.fixed.shape[2:])
        ms = tuple(int(n) for n in self.moving.shape[2:])
        self.f_fg = self.fixed > 0.1 * float(self.fixed.max().clamp_min(1e-12))
        self.m_thr = 0.1 * float(self.moving.max().clamp_min(1e-12))
        self.n_f = float(self.f_fg.sum())
        n_m = float((self.moving > self.m_thr).sum())
        # moving foreground volume in small-fixed voxels (before a candidate's change of volume)
        f_vox = max(_voxel_volume(self.fixed_u2w, self.shape), 1e-12)
        self.n_m_vox = n_m * _voxel_volume(self.moving_u2w, ms) / f_vox

    @torch.no_grad()
    def __call__(self, worlds: list[np.ndarray], chunk: int = 32) -> tuple[list[float], list[float]]:
        """``(losses, overlaps)`` of the candidates; ``loss = inf`` below ``min_overlap``.

        Args:
            worlds: ``(4, 4)`` world pull-backs (fixed world → moving world, mm).
            chunk: candidates warped and scored together.
        """
        losses: list[float] = []
        overlaps: list[float] = []
        dev = self.fixed.device
        for i in range(0, len(worlds), chunk):
            part = worlds[i:i + chunk]
            Ab = [_centred(W, self.fixed_u2w, self.moving_u2w) for W in part]
            A = torch.cat([a for a, _ in Ab]).to(device=dev, dtype=torch.float32)
            b = torch.cat([b for _, b in Ab]).to(device=dev, dtype=torch.float32)
            warped = warp(self.moving, affine_map(A, b, self.shape), padding="zeros")
            K = warped.shape[0]
            inter = (self.f_fg & (warped > self.m_thr)).flatten(1).sum(1).double().cpu().numpy()
            if self.similarity is None:
                loss_t = MKLNCC(reduction="none")(warped, self.fixed.expand(K, *self.fixed.shape[1:]))
                loss = [float(v) for v in loss_t.double().cpu()]
            else:
                loss = [float(self.similarity(warped[j:j + 1], self.fixed)) for j in range(K)]
            for W, n_int, l in zip(part, inter, loss):
                det = abs(float(np.linalg.det(np.asarray(W)[:3, :3])))
                ov = float(n_int) / max(min(self.n_f, self.n_m_vox / max(det, 1e-12)), 1.0)
                overlaps.append(min(ov, 1.0))
                losses.append(l if (ov >= self.min_overlap and math.isfinite(l)) else math.inf)
        return losses, overlaps


def _pick(order: list[str], scores: dict[str, float], tol: float) -> str | None:
    """First name in ``order`` whose score is at most ``best + tol``; ``None`` when none is finite."""
    finite = [scores[n] for n in order if math.isfinite(scores[n])]
    if not finite:
        return None
    best = min(finite)
    for name in order:
        if scores[name] <= best + tol:
            return name
    return None  # pragma: no cover - unreachable


@torch.no_grad()
def initial_affine(
    fixed_t: torch.Tensor,
    moving_t: torch.Tensor,
    fixed_u2w: np.ndarray,
    moving_u2w: np.ndarray,
    mode: str = "auto",
    *,
    world_matrix: np.ndarray | None = None,
    similarity: nn.Module | None = None,
    rotation_search: bool = False,
    eval_size: int = 32,
    tie_tolerance: float = 2e-3,
    min_overlap: float = 0.1,
    degenerate_gap: float = 0.05,
) -> InitResult:
    """Initial centred affine, fixed working unit → moving working unit coordinates.

    Args:
        fixed_t: ``(1, 1, D, H, W)`` fixed image on its working grid, float in
            [0, 1], background ≈ 0.
        moving_t: ``(1, 1, d, h, w)`` moving image on its working grid, same device.
        fixed_u2w, moving_u2w: ``(4, 4)`` float64 unit coordinates → world
            (LPS mm) of the two working grids (``Grid.unit_to_world()``).
        mode: one of :data:`INIT_MODES` (see the module docstring).  ``header``,
            ``com`` and ``file`` return their candidate whatever its score;
            ``moments`` picks the best of its sign variants; ``auto`` the best
            of all candidates.
        world_matrix: ``(4, 4)`` fixed-world → moving-world pull-back (LPS mm);
            required by, and only allowed with, ``mode="file"``.
        similarity: loss module ``f(warped, fixed) -> scalar`` (lower is better)
            on ``(1, 1, ...)`` tensors; default :class:`avsm.losses.lncc.MKLNCC`.
        rotation_search: in ``auto``, also try rotations of ±30°, ±60°, ±90°
            and 180° about each world axis through the centres of mass.
        eval_size: longest side (voxels) of the copies the candidates are scored on.
        tie_tolerance: absolute tolerance in loss units: candidates scoring at
            most ``best + tie_tolerance`` count as tied with the best; ties go
            to header, then com, then moments (smallest rotation first), then
            the rotation search.
        min_overlap: candidates whose foreground overlap fraction (overlap of
            the two foregrounds over the smaller one) is below this score ``inf``.
        degenerate_gap: relative eigenvalue gap under which two principal axes
            are considered interchangeable (their swap becomes a candidate).

    Returns:
        :class:`InitResult`; ``A0``/``b0`` are float32 on ``fixed_t``'s device.

    Raises:
        ValueError: bad mode or shapes, ``world_matrix`` with a mode other than
            ``file`` (or missing with ``file``), or an empty image with ``com`` / ``moments``.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"unknown initialisation mode {mode!r}; choose one of {', '.join(INIT_MODES)}")
    if (mode == "file") != (world_matrix is not None):
        raise ValueError("world_matrix is required by, and only allowed with, mode='file'")
    for name, t in (("fixed_t", fixed_t), ("moving_t", moving_t)):
        if t.dim() != 5 or t.shape[:2] != (1, 1):
            raise ValueError(f"{name} must have shape (1, 1, D, H, W), got {tuple(t.shape)}")
    f_u2w = np.asarray(fixed_u2w, dtype=np.float64)
    m_u2w = np.asarray(moving_u2w, dtype=np.float64)
    if f_u2w.shape != (4, 4) or m_u2w.shape != (4, 4):
        raise ValueError("fixed_u2w and moving_u2w must be (4, 4) matrices")
    device = fixed_t.device
    moving_t = moving_t.to(device)
    scorer = _Scorer(fixed_t, moving_t, f_u2w, m_u2w, similarity, eval_size, min_overlap)

    candidates: dict[str, np.ndarray] = {}
    if mode == "file":
        W = np.asarray(world_matrix, dtype=np.float64)
        if W.shape != (4, 4) or not np.all(np.isfinite(W)) or abs(np.linalg.det(W[:3, :3])) < 1e-9:
            raise ValueError("world_matrix must be a finite, invertible (4, 4) matrix")
        candidates["file"] = W
    if mode in ("auto", "header"):
        candidates["header"] = np.eye(4)
    if mode in ("auto", "com", "moments"):
        mf = image_moments(fixed_t, f_u2w)
        mm = image_moments(moving_t, m_u2w)
        if mf.mass > 0 and mm.mass > 0:
            if mode != "moments":
                candidates["com"] = _rigid(np.eye(3), mf.centre, mm.centre)
            if mode != "com":
                for k, R in enumerate(_moment_rotations(mf, mm, degenerate_gap)):
                    candidates["moments" if k == 0 else f"moments#{k}"] = _rigid(R, mf.centre, mm.centre)
            if mode == "auto" and rotation_search:
                for axis, ang in itertools.product(range(3), SEARCH_ANGLES_DEG):
                    name = f"rot[{'xyz'[axis]}{ang:+.0f}]"
                    candidates[name] = _rigid(_axis_rotation(axis, ang), mf.centre, mm.centre)
        elif mode != "auto":
            raise ValueError(f"mode {mode!r} needs images with non-zero intensity")
        else:
            log.warning("initialisation: an image is empty; only the header candidate is possible")

    order = list(candidates)  # insertion order = preference order
    losses, overlaps = scorer([candidates[n] for n in order])
    scores = dict(zip(order, losses))
    overlap = dict(zip(order, overlaps))
    if mode in ("auto", "moments"):
        chosen = _pick(order, scores, tie_tolerance)
        if chosen is None:
            chosen = order[0]
            log.warning("initialisation: no candidate overlaps (min_overlap=%g); using %s",
                        min_overlap, chosen)
    else:
        chosen = order[0]
        if not math.isfinite(scores[chosen]):
            log.warning("initialisation: the %s transform leaves the images with %.0f %% overlap",
                        chosen, 100.0 * overlap[chosen])
    W = candidates[chosen]
    A, b = _centred(W, f_u2w, m_u2w)
    listing = ", ".join(f"{n}={scores[n]:.4f} (overlap {overlap[n]:.2f})" for n in order)
    log.info("initialisation mode=%s: %s; chosen %s", mode, listing, chosen)
    return InitResult(
        A0=A.to(device=device, dtype=torch.float32),
        b0=b.to(device=device, dtype=torch.float32),
        chosen=chosen,
        scores=scores,
        world=W.copy(),
        overlap=overlap,
        mode=mode,
    )
