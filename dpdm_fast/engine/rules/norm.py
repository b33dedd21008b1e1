import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import groups, register_rule


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """Affine grads of a group: sum over its rows and positions of g * x_hat (weight) and g (bias)."""
    x = inputs[0]
    B, C, S = x.shape[0] // K, x.shape[1], math.prod(x.shape[2:])
    g4 = groups(g, K).reshape(B, K, C, S)
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
        out["weight"] = (g4 * groups(x_hat, K).reshape(B, K, C, S)).sum(dim=(1, 3))
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = g4.sum(dim=(1, 3))
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
