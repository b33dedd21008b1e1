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
    """Parameters laid end to end in a flat (P,) vector, and parameter by parameter in the flat
    per-example buffer: for B examples, parameter p's gradients are the contiguous (B, *p.shape)
    block at elements [B * offset, B * (offset + numel)).

    Blocks (rather than one (B, P) row per example) let a rule write its per-group gradients straight
    into the buffer with ``out=`` (a (B, *shape) block is what a batched GEMM produces), so there is no
    copy pass; the norm and clip-weighted sum passes then run block by block.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.slots: dict[int, Slot] = {}
        offset = 0
        for p in params:
            self.slots[id(p)] = Slot(p, offset, p.numel())
            offset += p.numel()
        self.size = offset
        self.params = params

    def block(self, storage: torch.Tensor, p: nn.Parameter, B: int) -> torch.Tensor:
        """The contiguous (B, *p.shape) block of parameter p in a flat buffer holding B examples."""
        s = self.slots[id(p)]
        return storage[B * s.offset:B * (s.offset + s.numel)].view(B, *p.shape)

    def flat_view(self, flat: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """p-shaped view into a flat (P,) vector."""
        s = self.slots[id(p)]
        return flat[s.offset:s.offset + s.numel].view_as(p)
