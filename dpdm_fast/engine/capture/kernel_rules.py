"""Kernel rules: the per-group gradients of the U-Net's layers computed by fused kernels.

A kernel rule ``fn(module, x, g, K, out, sq, saved) -> bool`` writes the per-group gradients of
the parameters named in ``out`` ({name: fp32 (B, *shape) buffer block}) and adds each group's
squared norm of them to ``sq[name]`` ((B,) fp32 rows of the norm table, zero on entry). It returns
False, having written nothing, for a call it does not cover (e.g. a dilated conv); the layer's
torch rule then runs. A kernel rule applies to exactly the modules its torch rule applies to
(``find_rule`` decides; a subclass that changes the computation gets neither).

The kernels take fp32, bf16 or fp16 operands and accumulate in fp32 into the fp32 buffer.

Kernel rules are keyed by the name of the backend that runs the step (``kernel_rules_for``): the
backends (``dpdm_fast.engine.clipping.backends``) hold only the clip/sum/noise pass and import
nothing from capture.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Dict

import torch
import torch.nn as nn

from ...models.layers import NIN
from .rules.conv import conv_padding

KernelRule = Callable[..., bool]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def plain_conv_padding(module: nn.Conv2d, x: torch.Tensor) -> tuple | None:
    """The padding of a conv the conv kernels cover (groups=1, no dilation, float input), else None."""
    if module.groups != 1 or tuple(module.dilation) != (1, 1) or x.dtype not in FLOATS:
        return None
    return conv_padding(module)


def triton_kernel_rules() -> Dict[type, KernelRule]:
    from dpdm_fast.kernels import conv_weight_grad, group_gemm, group_norm_grad, group_sum

    def conv2d(module: nn.Conv2d, x, g, K, out, sq, saved=None) -> bool:
        padding = plain_conv_padding(module, x)
        if padding is None:
            return False
        if "weight" in out:
            conv_weight_grad.conv2d_weight_grad(x, g, K, tuple(module.weight.shape), tuple(module.stride),
                                                padding, out["weight"], sq["weight"])
        if "bias" in out:
            group_sum.group_sum(g.reshape(g.shape[0], g.shape[1], -1), K, out["bias"], sq["bias"])
        return True

    def linear(module: nn.Linear, x, g, K, out, sq, saved=None) -> bool:
        if x.dtype not in FLOATS:
            return False
        N, T = x.shape[0], math.prod(x.shape[1:-1])
        gt = g.reshape(N, T, g.shape[-1]).transpose(1, 2)                 # (N, out, T), a view
        if "weight" in out:
            xt = x.reshape(N, T, x.shape[-1]).transpose(1, 2)             # (N, in, T)
            group_gemm.group_gemm(gt, xt, K, out["weight"].view(out["weight"].shape[0], *module.weight.shape),
                                  sq["weight"])
        if "bias" in out:
            group_sum.group_sum(gt, K, out["bias"], sq["bias"])
        return True

    def nin(module: NIN, x, g, K, out, sq, saved=None) -> bool:
        if x.dtype not in FLOATS:
            return False
        N = x.shape[0]
        x3, g3 = x.reshape(N, x.shape[1], -1), g.reshape(N, g.shape[1], -1)   # (N, C, HW), (N, O, HW)
        if "W" in out:
            group_gemm.group_gemm(x3, g3, K, out["W"], sq["W"])
        if "b" in out:
            group_sum.group_sum(g3, K, out["b"], sq["b"])
        return True

    def group_norm(module: nn.GroupNorm, x, g, K, out, sq, saved=None) -> bool:
        if x.dtype not in FLOATS:
            return False
        N, C = x.shape[:2]
        S = math.prod(x.shape[2:])
        if saved is None:  # the forward's statistics were not available: recompute them
            saved = torch.native_group_norm(x.float(), None, None, N, C, S, module.num_groups, module.eps)[1:]
        mean, rstd = saved
        group_norm_grad.group_norm_grad(x.reshape(N, C, S), g.reshape(N, C, S), mean, rstd, K, out.get("weight"),
                                        out.get("bias"), sq.get("weight"), sq.get("bias"))
        return True

    return {nn.Conv2d: conv2d, nn.Linear: linear, NIN: nin, nn.GroupNorm: group_norm}


def cuda_kernel_rules(backend) -> Dict[type, KernelRule]:
    """The CUDA C++ twin of the conv rule (``csrc/``), through the CUDA backend's loaded extension."""
    ext = backend.ext

    def conv2d(module: nn.Conv2d, x, g, K, out, sq, saved=None) -> bool:
        padding = plain_conv_padding(module, x)
        if padding is None or x.dtype != g.dtype:
            return False
        if "weight" in out:
            ext.conv2d_weight_grad(x, g, K, list(module.weight.shape), list(module.stride), list(padding),
                                   out["weight"], sq["weight"])
        if "bias" in out:
            torch.sum(g.reshape(g.shape[0] // K, K, g.shape[1], -1), dim=(1, 3), dtype=torch.float32, out=out["bias"])
            sq["bias"].add_(out["bias"].pow(2).sum(1))
        return True

    return {nn.Conv2d: conv2d}


# backend name -> factory(backend) -> {layer class: kernel rule}; backends without an entry use the torch rules
KERNEL_RULES: Dict[str, Callable] = {"triton": lambda backend: triton_kernel_rules(), "cuda": cuda_kernel_rules}
_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def kernel_rules_for(backend) -> Dict[type, KernelRule]:
    """{layer class: kernel rule} of ``backend`` (built once per backend object)."""
    factory = KERNEL_RULES.get(backend.name)
    if factory is None:
        return {}
    if backend not in _BUILT:
        _BUILT[backend] = factory(backend)
    return _BUILT[backend]
