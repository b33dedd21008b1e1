import math

import torch
import torch.nn as nn

from .registry import block, groups, register_rule


def check_lookup_options(module: nn.Module) -> None:
    """Embedding / EmbeddingBag options whose per-example gradients are not defined or mix examples."""
    name = type(module).__name__
    if module.max_norm is not None:
        raise NotImplementedError(f"{name}(max_norm=...) renormalises its weight in place during forward; "
                                  "per-example gradients of it are not supported: drop max_norm")
    if module.scale_grad_by_freq:
        raise NotImplementedError(f"{name}(scale_grad_by_freq=True) scales gradients by word counts over the "
                                  "whole batch, which mixes examples: use scale_grad_by_freq=False")



@register_rule(nn.Embedding, params=("weight",), check=check_lookup_options, input_ndim=lambda d: d >= 1)
def embedding_rule(module: nn.Embedding, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """Scatter-add each row's output gradient into its group's copy of the looked-up table row."""
    if not module.weight.requires_grad:
        return {}
    idx = inputs[0]
    B = idx.shape[0] // K
    V, D = module.weight.shape
    T = K * math.prod(idx.shape[1:])
    idx2 = groups(idx, K).reshape(B, T)                                      # (B, K*T)
    g3 = groups(g, K).reshape(B, T, D)                                       # (B, K*T, D)
    if module.padding_idx is not None:
        g3 = g3 * (idx2 != module.padding_idx).unsqueeze(-1).to(g3.dtype)
    flat = (idx2 + V * torch.arange(B, device=idx.device)[:, None]).reshape(-1)
    target = block(out, "weight")
    grad = torch.zeros(B * V, D, dtype=g.dtype, device=g.device) if target is None else target.view(B * V, D).zero_()
    grad.index_add_(0, flat, g3.reshape(-1, D))
    return {"weight": grad.view(B, V, D)}
