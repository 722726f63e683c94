"""Adam and L-BFGS (one iteration per step, no line search) as plain tensor code.

They compute exactly what ``torch.optim.Adam`` and ``torch.optim.LBFGS(max_iter=1,
line_search_fn=None, tolerance_grad=0, tolerance_change=0)`` compute (``tests/
test_fast_opt.py`` checks the iterates against torch's), without ``torch.optim``'s
first-use cost: constructing any ``torch.optim`` optimiser imports ``torch._dynamo``,
about 2 s on this project's machines, paid by every registration in a fresh process.
The strong-Wolfe L-BFGS of the ``paper`` preset still uses ``torch.optim.LBFGS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["Adam", "LBFGS", "cosine_lr"]


def cosine_lr(lr: float, step: int, total: int, eta_min: float) -> float:
    """Cosine-annealed learning rate at ``step`` of ``total`` (as ``CosineAnnealingLR``)."""
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * step / max(total, 1))) / 2.0


class Adam:
    """Adam (Kingma & Ba), bias-corrected, no weight decay.

    Args:
        params: tensors with ``.grad`` set before each :meth:`step`.
        lr: learning rate (may be changed between steps: ``opt.lr = ...``).
        betas, eps: as ``torch.optim.Adam``.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.betas = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update from the current gradients (``closure`` is evaluated first if given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bc1)
        return loss


class LBFGS:
    """L-BFGS with one iteration per :meth:`step` and a fixed step length (no line search).

    The first step has length ``lr · min(1, 1 / |g|₁)`` along ``-g``, later steps ``lr``
    along the two-loop quasi-Newton direction (history of ``history_size`` pairs;
    pairs with ``yᵀs ≤ 1e-10`` are skipped), as ``torch.optim.LBFGS`` does.

    Args:
        params: the tensors optimised (flattened together).
        lr: step length.
        history_size: number of ``(s, y)`` pairs kept.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float = 1.0, history_size: int = 100) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.history_size = int(history_size)
        self.n_iter = 0
        self.dirs: list[torch.Tensor] = []
        self.stps: list[torch.Tensor] = []
        self.ro: list[torch.Tensor] = []
        self.H_diag: torch.Tensor | float = 1.0
        self.d: torch.Tensor | None = None
        self.t = 0.0
        self.prev_grad: torch.Tensor | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients."""
        for p in self.params:
            p.grad = None

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.params])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Evaluate ``closure`` (loss and gradients), then move the parameters once."""
        with torch.enable_grad():
            loss = closure()
        g = self._flat_grad()
        if float(g.abs().max()) <= 0.0:
            return loss
        self.n_iter += 1
        if self.n_iter == 1:
            d = g.neg()
            self.dirs, self.stps, self.ro, self.H_diag = [], [], [], 1.0
        else:
            assert self.prev_grad is not None and self.d is not None
            y = g - self.prev_grad
            s = self.d * self.t
            ys = y.dot(s)
            if ys > 1e-10:
                if len(self.dirs) == self.history_size:
                    self.dirs.pop(0), self.stps.pop(0), self.ro.pop(0)
                self.dirs.append(y), self.stps.append(s), self.ro.append(1.0 / ys)
                self.H_diag = ys / y.dot(y)
            q = g.neg()
            al = [torch.zeros(())] * len(self.dirs)
            for i in range(len(self.dirs) - 1, -1, -1):
                al[i] = self.stps[i].dot(q) * self.ro[i]
                q.add_(self.dirs[i], alpha=-al[i])
            d = r = q * self.H_diag
            for i in range(len(self.dirs)):
                be = self.dirs[i].dot(r) * self.ro[i]
                r.add_(self.stps[i], alpha=al[i] - be)
        self.prev_grad = g.clone()
        self.t = min(1.0, 1.0 / float(g.abs().sum())) * self.lr if self.n_iter == 1 else self.lr
        if float(g.dot(d)) > 0.0:  # not a descent direction (tolerance_change = 0)
            self.d = d
            return loss
        self.d = d
        offset = 0
        for p in self.params:
            n = p.numel()
            p.add_(d[offset:offset + n].view_as(p), alpha=self.t)
            offset += n
        return loss
