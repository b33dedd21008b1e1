import math

import torch
import torch.nn as nn

from .norm import per_row_affine_grads
from .registry import register_rule

_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def _stats(module: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor):
    """The per-(row, channel) mean and 1/std the forward normalised with, shaped (1, N*C).

    As ``_InstanceNorm._apply_instance_norm``: the row's own statistics in training mode or without
    running statistics, else (eval with track_running_stats=True) the running ones."""
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if module.training or not module.track_running_stats:
        # instance norm is group norm with one group per channel (biased variance, the same eps)
        _, mean, rstd = torch.native_group_norm(x, None, None, N, C, S, C, module.eps)
        return mean.reshape(1, N * C), rstd.reshape(1, N * C)
    if module.running_mean is None or module.running_var is None:
        raise RuntimeError("InstanceNorm(track_running_stats=True) in eval mode without running statistics")
    mean = module.running_mean.to(x.dtype).repeat(N).reshape(1, N * C)
    rstd = torch.rsqrt(module.running_var.to(x.dtype) + module.eps).repeat(N).reshape(1, N * C)
    return mean, rstd


def instance_norm_rule(module: nn.modules.instancenorm._InstanceNorm, inputs: tuple, g: torch.Tensor, K: int,
                       out: dict | None = None) -> dict:
    """Affine grads of a group: sum over its K rows and positions of g * x_hat (weight) and g (bias).

    As for GroupNorm (``norm.py``), one call of the group-norm backward kernel on the N rows of C
    channels viewed as one row of N*C channels in N*C groups gives them per (row, channel); the
    statistics are those the forward used (the row's own, or the running ones in eval mode with
    track_running_stats=True), so the result is exact in both modes."""
    x = inputs[0]
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    B = N // K
    need_w = module.weight is not None and module.weight.requires_grad
    need_b = module.bias is not None and module.bias.requires_grad
    if N % K:
        raise ValueError(f"{N} rows is not a multiple of the noise multiplicity K={K}: "
                         "each example must contribute exactly K consecutive rows")
    if N == 0 or S == 0:
        return {n: x.new_zeros(B, C, dtype=g.dtype) for n, need in (("weight", need_w), ("bias", need_b)) if need}
    mean, rstd = _stats(module, x)
    return per_row_affine_grads(x, g, mean, rstd, C, K, need_w, need_b, out)   # one group per channel


for _cls, _ndim in _DIMS.items():   # one registration per class: each accepts only its batched rank
    register_rule(_cls, methods=("forward", "_apply_instance_norm"),
                  input_ndim=lambda d, n=_ndim: d == n)(instance_norm_rule)
