"""Opacus's ``p.grad_sample`` and ``p.summed_grad``, as views of the engine's own tensors (no copies).

After each backward pass, for every trainable parameter ``p``:
- ``p.grad_sample``: the (B, *p.shape) block of the per-example buffer: each example's gradient (the
  average over its K rows, scaled for the loss reduction as Opacus scales it), before clipping; None for a
  parameter this pass did not reach. Valid until the next backward pass, which overwrites the buffer.
- ``p.summed_grad``: the p-shaped view of the running sum of clipped per-example gradients of the
  current step (all its backward passes so far), before noise. It stays readable after ``step()`` until
  the next backward pass starts a new sum.

Writing to them: ``summed_grad`` is what the step noises, so an in-place change to it changes the step,
as in Opacus. ``grad_sample`` has already been clipped and summed when the user sees it, so a change to it
(in place, or a new tensor assigned) could never reach the step: it is refused with an error at the next
backward or step instead of being silently ignored.
"""
from __future__ import annotations

import torch

from .layout import FlatLayout


class OpacusViews:
    """Sets, checks and clears the Opacus-style attributes of the layout's parameters."""

    def __init__(self, layout: FlatLayout):
        self.layout = layout
        self.exposed: dict[int, torch.Tensor | None] = {}   # id(param) -> the grad_sample view it was given
        self.storage: torch.Tensor | None = None
        self.version: int | None = None

    def expose(self, buffer, B: int, written: set, clipped_sum: torch.Tensor) -> None:
        """After a backward pass (blocks scaled and folded into ``clipped_sum``)."""
        for p in self.layout.params:
            view = buffer.blocks[id(p)] if id(p) in written else None
            p.grad_sample = view
            p.summed_grad = self.layout.flat_view(clipped_sum, p)
            self.exposed[id(p)] = view
        self.storage, self.version = buffer.storage, buffer.storage._version

    def check_unchanged(self) -> None:
        """Refuse a write to ``p.grad_sample`` since the last backward (it cannot reach the step any more)."""
        if self.storage is None:
            return
        changed = self.storage._version != self.version
        replaced = [i for i, view in self.exposed.items()
                    if getattr(self.layout.slots[i].param, "grad_sample", None) is not view]
        if changed or replaced:
            raise RuntimeError("p.grad_sample was modified (in place or replaced) after backward: the engine had "
                               "already clipped and summed the per-example gradients, so the change could not "
                               "reach the step. Change the loss or the model instead; p.summed_grad (the clipped "
                               "sum the step noises) may be changed in place before step(), as in Opacus")

    def invalidate(self) -> None:
        """A backward pass starts overwriting the buffer: nothing to check until it exposes new views."""
        self.storage = self.version = None

    def clear(self, summed_grad: bool = True) -> None:
        """Opacus's ``zero_grad``: grad_sample is dropped (and summed_grad, unless a step was skipped)."""
        for p in self.layout.params:
            p.grad_sample = None
            if summed_grad:
                p.summed_grad = None
        self.exposed = {id(p): None for p in self.layout.params}
        self.storage = self.version = None
