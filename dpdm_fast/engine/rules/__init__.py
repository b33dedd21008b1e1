"""Per-layer rules: the per-*group* gradient of a layer's parameters, computed directly.

A rule receives the layer's input activations ``x`` and the gradient ``g`` flowing into its
output, both with N = B*K rows laid out group-major (rows b*K .. b*K+K-1 are example b), and
returns, for each trainable parameter, the tensor (B, *param.shape) whose b-th entry is
sum over the K rows of example b of that row's gradient contribution. The sum over K happens
inside the GEMM/convolution: the B*K per-row gradients are never materialised.

Rules are registered per module type with ``@register_rule(nn.Conv2d)``, one file per layer,
like Opacus's ``grad_sample/``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn

Rule = Callable[[nn.Module, tuple, torch.Tensor, int], Dict[str, torch.Tensor]]
RULES: Dict[type, Rule] = {}


def register_rule(*module_types: type) -> Callable[[Rule], Rule]:
    """Register ``fn(module, inputs, grad_output, K) -> {param_name: (B, *shape)}``."""
    def wrap(fn: Rule) -> Rule:
        for t in module_types:
            RULES[t] = fn
        return fn
    return wrap


def find_rule(module: nn.Module) -> Rule | None:
    """The rule of the module's exact type, else of its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def groups(t: torch.Tensor, K: int) -> torch.Tensor:
    """View (B*K, ...) rows as (B, K, ...)."""
    if t.shape[0] % K:
        raise ValueError(f"{t.shape[0]} rows is not a multiple of the noise multiplicity K={K}: "
                         "each example must contribute exactly K consecutive rows")
    return t.reshape(t.shape[0] // K, K, *t.shape[1:])


from . import conv, embedding, linear, nin, norm  # noqa: E402,F401  (registration)
from .functorch import functorch_rule  # noqa: E402,F401
