"""Where each trainable parameter lives in the flat per-example gradient buffer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Slot:
    param: nn.Parameter
    offset: int
    numel: int


class FlatLayout:
    """Parameters laid end to end: row b of a (B, P) buffer is example b's whole gradient.

    Keeping per-example gradients contiguous makes norms, clip-weighted sums and noise a few
    passes over one block of memory, which is what the clip/noise backends (and later kernels)
    operate on.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.slots: dict[int, Slot] = {}
        offset = 0
        for p in params:
            self.slots[id(p)] = Slot(p, offset, p.numel())
            offset += p.numel()
        self.size = offset
        self.params = params

    def view(self, buffer: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """The (B, *p.shape) strided view of parameter p inside a (B, P) buffer."""
        s = self.slots[id(p)]
        return buffer[:, s.offset:s.offset + s.numel].view(buffer.shape[0], *p.shape)

    def flat_view(self, flat: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """p-shaped view into a flat (P,) vector."""
        s = self.slots[id(p)]
        return flat[s.offset:s.offset + s.numel].view_as(p)
