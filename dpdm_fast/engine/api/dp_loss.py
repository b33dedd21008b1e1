"""Opacus's ghost-clipping loss API (``make_private(..., grad_sample_mode="ghost", criterion=...)``).

Opacus's ghost mode needs the loss wrapped because it runs two backward passes (norms, then the
re-weighted gradient) inside ``loss.backward()``. This engine computes the same clipped per-example
gradients in the one ordinary backward, so the wrapper only keeps Opacus's interface: calling it returns
a ``DPLossTensor`` of per-example losses whose ``backward()`` is the reduced loss's backward.
"""
from __future__ import annotations

import torch


class DPLossTensor:
    """Per-example losses; ``backward()`` reduces them as the engine's ``loss_reduction`` says."""

    def __init__(self, loss_per_sample: torch.Tensor, loss_reduction: str):
        self.loss_per_sample, self.loss_reduction = loss_per_sample, loss_reduction

    def reduced(self) -> torch.Tensor:
        return self.loss_per_sample.mean() if self.loss_reduction == "mean" else self.loss_per_sample.sum()

    def backward(self, **kwargs) -> None:
        self.reduced().backward(**kwargs)

    def detach(self) -> torch.Tensor:
        return self.reduced().detach()

    def item(self) -> float:
        return self.detach().item()

    def _combine(self, other, op) -> "DPLossTensor":
        if isinstance(other, DPLossTensor):
            if other.loss_reduction != self.loss_reduction:
                raise ValueError(f"cannot combine losses with reductions {self.loss_reduction!r} and "
                                 f"{other.loss_reduction!r}")
            other = other.loss_per_sample
        return DPLossTensor(op(self.loss_per_sample, other), self.loss_reduction)

    def __add__(self, other):
        return self._combine(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, torch.sub)

    def __rsub__(self, other):
        return self._combine(other, lambda a, b: b - a)

    def __mul__(self, other):
        return self._combine(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._combine(other, torch.div)

    def __repr__(self) -> str:
        return f"DPLossTensor({self.detach()!r}, loss_reduction={self.loss_reduction!r})"


class DPLoss:
    """Wraps a criterion with a ``reduction`` attribute (e.g. ``nn.CrossEntropyLoss()``).

    ``shape=(B, T, ...)``, as in Opacus: the criterion's B*T per-position losses are reduced per
    sequence first (the privacy unit is the sequence), honouring ``ignore_index`` for 'mean'."""

    def __init__(self, criterion, loss_reduction: str):
        if criterion is None:
            raise ValueError("grad_sample_mode='ghost' needs criterion= (e.g. nn.CrossEntropyLoss()), as in Opacus")
        if not hasattr(criterion, "reduction"):
            raise TypeError(f"the criterion {type(criterion).__name__} has no `reduction` attribute; pass a torch "
                            "loss module")
        if criterion.reduction != loss_reduction:
            raise ValueError(f"the criterion's reduction {criterion.reduction!r} differs from make_private's "
                             f"loss_reduction {loss_reduction!r}")
        self.criterion, self.loss_reduction = criterion, loss_reduction

    def __call__(self, *args, shape=None, **kwargs) -> DPLossTensor:
        old, self.criterion.reduction = self.criterion.reduction, "none"
        try:
            per = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = old
        if shape is not None and per.shape[0] == shape[0] * shape[1]:
            per = per.view(shape[0], shape[1])
            if self.loss_reduction == "sum":
                per = per.sum(dim=1)
            else:
                target = kwargs.get("target", args[1] if len(args) > 1 else None)
                ignore = getattr(self.criterion, "ignore_index", None)
                if ignore is not None and target is not None:
                    valid = (target.view(shape[0], shape[1]) != ignore)
                    per = per.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
                else:
                    per = per.mean(dim=1)
        return DPLossTensor(per, self.loss_reduction)
