import math

import torch
import torch.nn as nn

from . import groups, register_rule


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """W grad of group b = sum over its K rows (and any extra positions) of g^T x: one batched GEMM."""
    x = inputs[0]
    B = x.shape[0] // K
    T = math.prod(x.shape[1:-1])                           # extra positions per row (1 for 2-D input)
    x3 = groups(x, K).reshape(B, K * T, x.shape[-1])       # (B, K*T, in)
    g3 = groups(g, K).reshape(B, K * T, g.shape[-1])       # (B, K*T, out)
    out = {}
    if module.weight.requires_grad:
        out["weight"] = torch.bmm(g3.transpose(1, 2), x3)  # (B, out, in)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = g3.sum(dim=1)
    return out
