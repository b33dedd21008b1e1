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
    # per-layer clipping: (params,) bounds and the (params, B) per-parameter norms (None: flat clipping)
    layer_bounds: torch.Tensor | None = None
    param_norms: torch.Tensor | None = None

    def factors(self) -> torch.Tensor:
        """Flat clipping: (B,) clip factors (times ``scale``); per-layer: (params, B), one row per parameter."""
        if self.layer_bounds is not None:
            return (self.layer_bounds[:, None] / (self.param_norms + 1e-6)).clamp(max=1.0) * self.scale
        return (self.max_grad_norm / (self.norms + 1e-6)).clamp(max=1.0) * self.scale

    def unclipped(self) -> torch.Tensor:
        """How many examples flat clipping leaves unchanged (factor 1), as Opacus's adaptive clipping counts."""
        return (self.max_grad_norm / (self.norms + 1e-6) >= 1.0).sum()

    def blocks(self):
        """(index, param, its (B, numel) block) for each parameter this backward wrote."""
        for i, (p, w) in enumerate(zip(self.layout.params, self.written)):
            if w:
                yield i, p, self.layout.block(self.storage, p, self.B).view(self.B, p.numel())


@dataclass
class Noise:
    """The final pass of a step: out = (clipped sum + N(0, std^2)) / divisor."""
    std: float
    generator: torch.Generator | None
    secure_mode: bool
    divisor: float
