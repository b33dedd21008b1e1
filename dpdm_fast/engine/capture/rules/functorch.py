"""Fallback for modules without a rule: per-group gradients with torch.func (vmap over groups)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .registry import groups


def functorch_rule(module: nn.Module, inputs: tuple, g: torch.Tensor, K: int, kwargs: dict | None = None) -> dict:
    """vjp of sum_r <module(x_r), g_r> over the K rows of each group, vmapped over groups.

    Only the module's own (direct) trainable parameters are differentiated. Tensor arguments
    (positional or keyword) must carry the N rows on dim 0 and are split into groups; other
    arguments are passed through unchanged. (``PrivateModule`` refuses tensor arguments with
    another leading size when the model is called, so nothing is guessed here.)
    """
    kwargs = kwargs or {}
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if not params:
        return {}
    buffers = {n: b for n, b in module.named_buffers(recurse=False)}
    pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    kw = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def group_loss(p, g_rows, pos_rows, kw_rows):
        args = list(inputs)
        for i, t in zip(pos, pos_rows):
            args[i] = t
        out = functional_call(module, {**p, **buffers}, tuple(args), {**kwargs, **dict(zip(kw, kw_rows))})
        return (out * g_rows).sum()

    pos_groups = tuple(groups(inputs[i], K) for i in pos)
    kw_groups = tuple(groups(kwargs[k], K) for k in kw)
    return vmap(grad(group_loss), in_dims=(None, 0, 0, 0))(params, groups(g, K), pos_groups, kw_groups)
