"""Per-group Conv2d weight gradient as an implicit GEMM, with each group's squared norm.

For group b (rows b*K .. b*K+K-1) the gradient of a conv weight (O, C, kh, kw) is a GEMM
(O x R) @ (R x C*kh*kw) reducing over the R = K*Ho*Wo output positions of the group's rows:
the left factor is the output gradient, the right one the input patch at each position. The
patches are gathered from the input tile by tile (no unfold tensor in memory), the result goes
straight into the group's (O, C*kh*kw) slice of the engine's per-example buffer, and its squared
Frobenius norm is added to ``sqnorm[b]`` in the epilogue (one atomic add per tile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, check_inputs, check_output, dot_precision, upcast_inputs


@triton.jit
def _conv_weight_grad_kernel(x_ptr, g_ptr, out_ptr, sq_ptr,
                             K, C, H, W, O, WO, HWO, R, NCOL,
                             sxn, sxc, sxh, sxw, sgn, sgo, sgh, sgw,
                             SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                             KH: tl.constexpr, KW: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)                 # output channels
    n = pid_n * BN + tl.arange(0, BN)                 # (c, kh, kw), flattened as in the weight
    c = n // (KH * KW)
    kh = (n // KW) % KH
    kw = n % KW
    m_ok = m < O
    n_ok = n < NCOL
    # the input offset of (position r, column n) splits into a part of r and a part of n, so the
    # per-element index work in the loop is one add and the bounds checks
    col_off = c * sxc + kh * sxh + kw * sxw
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)                     # (k, ho, wo) of the group's output positions
        r_ok = r < R
        k = r // HWO
        pos = r % HWO
        ho = pos // WO
        wo = pos % WO
        row = (b * K + k).to(tl.int64)
        a = tl.load(g_ptr + row[None, :] * sgn + m[:, None] * sgo + ho[None, :] * sgh + wo[None, :] * sgw,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        h0 = ho * SH - PH                             # the patch's top-left input pixel
        w0 = wo * SW - PW
        ih = h0[:, None] + kh[None, :]
        iw = w0[:, None] + kw[None, :]
        inside = r_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row_off = row * sxn + h0 * sxh + w0 * sxw
        patch = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=inside, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            patch = patch.to(tl.float32)
        acc = tl.dot(a, patch, acc, input_precision=PRECISION)
    tl.store(out_ptr + b.to(tl.int64) * O * NCOL + m[:, None] * NCOL + n[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])
    tl.atomic_add(sq_ptr + b, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def conv2d_weight_grad(x: torch.Tensor, g: torch.Tensor, K: int, weight_shape: tuple, stride: tuple = (1, 1),
                       padding: tuple = (0, 0), out: torch.Tensor | None = None, sqnorm: torch.Tensor | None = None,
                       allow_tf32: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group weight gradients (B, O, C, kh, kw) of a groups=1, dilation=1 conv, into ``out``,
    with each group's squared norm added to ``sqnorm`` (B,). Both fp32; x, g fp32/bf16/fp16.

    ``allow_tf32`` (default: torch's ``torch.backends.cudnn.allow_tf32``, as the convolution
    itself would) lets fp32 operands use TF32 tensor cores on GPUs.
    """
    check_inputs(x, g)
    N, C, H, W = x.shape
    O, HO, WO = g.shape[1:]
    KH, KW = weight_shape[2:]
    if weight_shape[1] != C or weight_shape[0] != O or g.shape[0] != N or N % K:
        raise ValueError(f"shapes do not fit a conv weight gradient: x {tuple(x.shape)}, g {tuple(g.shape)}, "
                         f"weight {tuple(weight_shape)}, K={K}")
    B = N // K
    out = torch.empty(B, *weight_shape, dtype=torch.float32, device=x.device) if out is None else out
    sqnorm = torch.zeros(B, dtype=torch.float32, device=x.device) if sqnorm is None else sqnorm
    check_output(out, (B, *weight_shape))
    check_output(sqnorm, (B,), "sqnorm")
    if B == 0:
        return out, sqnorm
    ncol, R = C * KH * KW, K * HO * WO
    BM, BN, BR = block(O), block(ncol), block(R, hi=32)
    tf32 = torch.backends.cudnn.allow_tf32 if allow_tf32 is None else allow_tf32
    grid = (triton.cdiv(O, BM), triton.cdiv(ncol, BN), B)
    _conv_weight_grad_kernel[grid](x, g, out, sqnorm, K, C, H, W, O, WO, HO * WO, R, ncol,
                                   *x.stride(), *g.stride(), stride[0], stride[1], padding[0], padding[1], KH, KW,
                                   BM=BM, BN=BN, BR=BR, PRECISION=dot_precision(tf32 and x.dtype == torch.float32),
                                   UPCAST=upcast_inputs(x.dtype))
    return out, sqnorm


def reference_conv2d_weight_grad(x: torch.Tensor, g: torch.Tensor, K: int, weight_shape: tuple,
                                 stride: tuple = (1, 1), padding: tuple = (0, 0)) -> torch.Tensor:
    """What the kernel computes, one ordinary fp32 weight gradient per group of K rows."""
    x, g = x.float(), g.float()
    return torch.stack([torch.nn.grad.conv2d_weight(x[i:i + K], weight_shape, g[i:i + K], stride=stride,
                                                    padding=padding) for i in range(0, x.shape[0], K)])
