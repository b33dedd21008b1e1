import math

import torch
import torch.nn as nn

from . import groups, register_rule


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """Scatter-add each row's output gradient into its group's copy of the looked-up table row."""
    if not module.weight.requires_grad:
        return {}
    if module.max_norm is not None:
        raise NotImplementedError("Embedding with max_norm renormalises its weight in place; no per-group rule")
    idx = inputs[0]
    B = idx.shape[0] // K
    V, D = module.weight.shape
    T = K * math.prod(idx.shape[1:])
    idx2 = groups(idx, K).reshape(B, T)                                      # (B, K*T)
    g3 = groups(g, K).reshape(B, T, D)                                       # (B, K*T, D)
    if module.padding_idx is not None:
        g3 = g3 * (idx2 != module.padding_idx).unsqueeze(-1).to(g3.dtype)
    flat = (idx2 + V * torch.arange(B, device=idx.device)[:, None]).reshape(-1)
    grad = torch.zeros(B * V, D, dtype=g.dtype, device=g.device)
    grad.index_add_(0, flat, g3.reshape(-1, D))
    return {"weight": grad.reshape(B, V, D)}
