import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import block, groups, register_rule


@register_rule(nn.RMSNorm, params=("weight",))
def rms_norm_rule(module: nn.RMSNorm, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """y = x / sqrt(mean(x^2) + eps) * weight over the trailing ``normalized_shape`` dims: the weight grad of
    a group sums g * x_hat over its K rows and their leading positions. x_hat is recomputed with the
    forward's own ``F.rms_norm`` (eps=None -> torch's default, finfo(dtype).eps, as in the forward)."""
    if module.weight is None or not module.weight.requires_grad:
        return {}
    x = inputs[0]
    shape = tuple(module.normalized_shape)
    if x.dim() <= len(shape):
        raise ValueError(f"RMSNorm{shape} got an input of shape {tuple(x.shape)}: it normalises over the rows' "
                         "dim 0 too, which mixes examples; per-example gradients need the rows outside "
                         "normalized_shape")
    B = x.shape[0] // K
    T = K * math.prod(x.shape[1:x.dim() - len(shape)])
    x_hat = F.rms_norm(x, shape, None, module.eps)
    prod = groups(g, K).reshape(B, T, *shape) * groups(x_hat, K).reshape(B, T, *shape)
    return {"weight": torch.sum(prod, dim=1, out=block(out, "weight"))}
