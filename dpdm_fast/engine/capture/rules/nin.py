import math

import torch

from ....models.layers import NIN
from .registry import block, groups, register_rule


@register_rule(NIN, params=("W", "b"), input_ndim=lambda d: d >= 3)
def nin_rule(module: NIN, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """y = x^T W + b over channels at each pixel: W grad of a group sums x g^T over its K rows and pixels."""
    x = inputs[0]
    B, C, O, S = x.shape[0] // K, x.shape[1], g.shape[1], math.prod(x.shape[2:])
    x3 = groups(x, K).reshape(B, K, C, S).transpose(1, 2).reshape(B, C, K * S)   # (B, C, K*HW)
    g3 = groups(g, K).reshape(B, K, O, S).transpose(1, 2).reshape(B, O, K * S)   # (B, O, K*HW)
    res = {}
    if module.W.requires_grad:
        res["W"] = torch.bmm(x3, g3.transpose(1, 2), out=block(out, "W"))      # (B, C, O)
    if module.b.requires_grad:
        res["b"] = torch.sum(g3, dim=2, out=block(out, "b"))
    return res
