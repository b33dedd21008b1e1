import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import groups, register_rule


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """Affine grads of a group: sum over its rows and positions of g * x_hat (weight) and g (bias).

    x_hat = (x - mean) * rstd is never materialised: per row and channel,
    sum_s g * x_hat = rstd * (sum_s g * x - mean * sum_s g), with mean/rstd per (row, norm group).
    """
    x = inputs[0]
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    B, G = N // K, module.num_groups
    if N == 0:
        return {n: p.new_zeros(0, *p.shape) for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    g3 = g.reshape(N, C, S)
    g_sum = g3.sum(dim=2)                                                    # (N, C)
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        x3 = x.reshape(N, C, S)
        var, mean = torch.var_mean(x.reshape(N, G, C // G * S), dim=2, unbiased=False)
        rstd = torch.rsqrt(var + module.eps).repeat_interleave(C // G, dim=1)
        mean = mean.repeat_interleave(C // G, dim=1)                             # (N, C)
        gx = torch.einsum("ncs,ncs->nc", g3, x3)
        out["weight"] = (rstd * (gx - mean * g_sum)).reshape(B, K, C).sum(dim=1)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = g_sum.reshape(B, K, C).sum(dim=1)
    return out


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    x = inputs[0]
    B = x.shape[0] // K
    shape = module.normalized_shape
    T = K * math.prod(x.shape[1:x.dim() - len(shape)])
    g3 = groups(g, K).reshape(B, T, *shape)
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        x_hat = F.layer_norm(x, shape, eps=module.eps)
        out["weight"] = (g3 * groups(x_hat, K).reshape(B, T, *shape)).sum(dim=1)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = g3.sum(dim=1)
    return out
