"""Per-group gradient of Linear and NIN (attention projection) weights: a batched GEMM reducing
over the K rows of a group and their positions, with each group's squared norm.

``out[b] = sum over k < K, s < S of a[b*K+k, :, s] (outer) c[b*K+k, :, s]`` for a (N, M, S) and
c (N, P, S) of any strides: for Linear (y = x W^T + bias over T positions) a is the output gradient
seen as (N, out, T) and c the input as (N, in, T); for NIN (y = x^T W + b at each pixel) a is the
input (N, C, HW) and c the output gradient (N, O, HW). Both are views, not copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, check_inputs, check_output, dot_precision, upcast_inputs


@triton.jit
def _group_gemm_kernel(a_ptr, c_ptr, out_ptr, sq_ptr, K, M, P, S, R,
                       sar, sam, sas, scr, scp, scs,
                       BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    m_ok = m < M
    n_ok = n < P
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)                     # (k, s): row k of the group, position s
        r_ok = r < R
        row = (b * K + r // S).to(tl.int64)
        s = r % S
        a = tl.load(a_ptr + row[None, :] * sar + m[:, None] * sam + s[None, :] * sas,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        c = tl.load(c_ptr + row[:, None] * scr + n[None, :] * scp + s[:, None] * scs,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a, c, acc, input_precision=PRECISION)
    tl.store(out_ptr + b.to(tl.int64) * M * P + m[:, None] * P + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
    tl.atomic_add(sq_ptr + b, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def group_gemm(a: torch.Tensor, c: torch.Tensor, K: int, out: torch.Tensor | None = None,
               sqnorm: torch.Tensor | None = None, allow_tf32: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, P) per-group sums of outer products, into ``out``, squared norms added to ``sqnorm``.

    ``allow_tf32`` defaults to torch's ``torch.backends.cuda.matmul.allow_tf32`` (what torch.bmm
    would use for the same fp32 product).
    """
    check_inputs(a, c)
    if a.dim() != 3 or c.dim() != 3 or a.shape[0] != c.shape[0] or a.shape[2] != c.shape[2] or a.shape[0] % K:
        raise ValueError(f"group_gemm needs a (N, M, S) and c (N, P, S) with N a multiple of K={K}, got "
                         f"{tuple(a.shape)} and {tuple(c.shape)}")
    N, M, S = a.shape
    P = c.shape[1]
    B = N // K
    out = torch.empty(B, M, P, dtype=torch.float32, device=a.device) if out is None else out
    sqnorm = torch.zeros(B, dtype=torch.float32, device=a.device) if sqnorm is None else sqnorm
    check_output(out, (B, M, P))
    check_output(sqnorm, (B,), "sqnorm")
    if B == 0:
        return out, sqnorm
    R = K * S
    BM, BN, BR = block(M), block(P), block(R, hi=32)
    tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    grid = (triton.cdiv(M, BM), triton.cdiv(P, BN), B)
    _group_gemm_kernel[grid](a, c, out, sqnorm, K, M, P, S, R, *a.stride(), *c.stride(), BM=BM, BN=BN, BR=BR,
                             PRECISION=dot_precision(tf32 and a.dtype == torch.float32),
                             UPCAST=upcast_inputs(a.dtype))
    return out, sqnorm


def reference_group_gemm(a: torch.Tensor, c: torch.Tensor, K: int) -> torch.Tensor:
    """What the kernel computes, in fp32 with einsum."""
    N, M, S = a.shape
    return torch.einsum("bkms,bkps->bmp", a.float().reshape(N // K, K, M, S), c.float().reshape(N // K, K, -1, S))
