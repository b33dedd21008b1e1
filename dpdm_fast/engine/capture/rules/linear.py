import math

import torch
import torch.nn as nn

from .registry import block, groups, register_rule


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None,
                accumulate: bool = False) -> dict:
    """W grad of group b = sum over its K rows (and any extra positions) of g^T x: one batched GEMM
    (with ``accumulate``, added into the blocks by the GEMM itself: a layer run at every time step)."""
    x = inputs[0]
    B = x.shape[0] // K
    T = math.prod(x.shape[1:-1])                           # extra positions per row (1 for 2-D input)
    x3 = groups(x, K).reshape(B, K * T, x.shape[-1])       # (B, K*T, in)
    g3 = groups(g, K).reshape(B, K * T, g.shape[-1])       # (B, K*T, out)
    if accumulate:
        res = {}
        if module.weight.requires_grad:
            res["weight"] = out["weight"].baddbmm_(g3.transpose(1, 2), x3)
        if module.bias is not None and module.bias.requires_grad:
            res["bias"] = out["bias"].add_(g3.sum(dim=1))
        return res
    res = {}
    if module.weight.requires_grad:
        res["weight"] = torch.bmm(g3.transpose(1, 2), x3, out=block(out, "weight"))  # (B, out, in)
    if module.bias is not None and module.bias.requires_grad:
        res["bias"] = torch.sum(g3, dim=1, out=block(out, "bias"))
    return res
