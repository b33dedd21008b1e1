"""What a backend is handed: one backward's buffer to clip and sum (``ClipJob``), and a step's noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import FlatLayout


@dataclass
class ClipJob:
    """One backward pass's per-example gradients, waiting to be clipped and summed."""
    layout: FlatLayout
    storage: torch.Tensor       # the flat buffer: param after param, a (B, numel) block each
    B: int
    written: list               # per parameter of the layout: did this backward write its block
    norms: torch.Tensor         # (B,) fp32 per-example norms (scaled as the gradients are)
    max_grad_norm: float
    scale: float                # the per-example scale (loss reduction, average over K) of the gradients

    def factors(self) -> torch.Tensor:
        return (self.max_grad_norm / (self.norms + 1e-6)).clamp(max=1.0) * self.scale

    def blocks(self):
        """(param, its (B, numel) block) for each parameter this backward wrote."""
        for p, w in zip(self.layout.params, self.written):
            if w:
                yield p, self.layout.block(self.storage, p, self.B).view(self.B, p.numel())


@dataclass
class Noise:
    """The final pass of a step: out = (clipped sum + N(0, std^2)) / divisor."""
    std: float
    generator: torch.Generator | None
    secure_mode: bool
    divisor: float
