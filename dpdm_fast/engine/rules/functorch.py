"""Fallback for modules without a rule: per-group gradients with torch.func (vmap over groups)."""
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from . import groups


def functorch_rule(module: nn.Module, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """vjp of sum_r <module(x_r), g_r> over the K rows of each group, vmapped over groups.

    Only the module's own (direct) trainable parameters are differentiated; all positional
    inputs must be tensors with the rows on dim 0.
    """
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if not params:
        return {}
    if not all(isinstance(a, torch.Tensor) for a in inputs):
        raise NotImplementedError(f"{type(module).__name__}: the torch.func fallback needs tensor inputs only")
    buffers = {n: b for n, b in module.named_buffers(recurse=False)}

    def group_loss(p, g_rows, *x_rows):
        out = functional_call(module, {**p, **buffers}, x_rows)
        return (out * g_rows).sum()

    grouped = [groups(a, K) for a in inputs]
    return vmap(grad(group_loss), in_dims=(None, 0) + (0,) * len(grouped))(params, groups(g, K), *grouped)
