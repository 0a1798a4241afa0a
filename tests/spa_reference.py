"""The paper's SPA recursion written out literally, as an independent reference for the tests."""

from __future__ import annotations

import torch


class ReferenceSPA:
    """``z <- z - eta*g; x <- (1-c)*x + c*z`` with two explicit tensors per parameter."""

    def __init__(self, params: list[torch.Tensor], weight_decay: float = 0.0) -> None:
        self.params = params
        self.weight_decay = weight_decay
        self.zs = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self, eta: float, c: float) -> None:
        for p, z in zip(self.params, self.zs, strict=True):
            assert p.grad is not None
            g = p.grad + self.weight_decay * p
            z.sub_(eta * g)
            p.mul_(1 - c).add_(c * z)
