"""Per-level stopping rule shared by affine-opt and vSVF-opt."""

from __future__ import annotations

from collections import deque


class RelativeChangeStop:
    """Stop when the energy has not decreased by more than ``tol`` (relative) over ``window`` iterations.

    ``update(E)`` is called once per iteration with the current energy and
    returns ``True`` when the level should stop: the lowest energy of the last
    ``window`` iterations lies less than ``tol · |E₀|`` below ``E₀``, the
    energy ``window`` iterations earlier.  ``tol = 0`` never stops (the iteration budget decides).
    (ANTs' convergence test is similar in spirit: the slope of the energy over
    a window of iterations, relative to its value.)
    """

    def __init__(self, tol: float, window: int = 5) -> None:
        if tol < 0 or window < 1:
            raise ValueError("tol must be >= 0 and window >= 1")
        self.tol = float(tol)
        self.window = int(window)
        self._recent: deque[float] = deque(maxlen=window + 1)

    def update(self, energy: float) -> bool:
        """Record one iteration's energy; ``True`` means stop."""
        if self.tol == 0:
            return False
        self._recent.append(float(energy))
        if len(self._recent) <= self.window:
            return False
        before = self._recent[0]
        best_recent = min(list(self._recent)[1:])
        return (before - best_recent) < self.tol * max(abs(before), 1e-12)
