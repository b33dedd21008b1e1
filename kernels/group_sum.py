"""Per-group bias gradient: the sum over a group's K rows and positions, with its squared norm.

``out[b, m] = sum over k < K, s < S of a[b*K+k, m, s]`` for an output gradient a (N, M, S) of any
strides: a conv or NIN bias (a = (N, O, HW)), a Linear bias (a = (N, out, T), a transposed view).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, check_inputs, check_output


@triton.jit
def _group_sum_kernel(a_ptr, out_ptr, sq_ptr, K, M, S, R, sar, sam, sas,
                      BM: tl.constexpr, BR: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    m_ok = m < M
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        row = (b * K + r // S).to(tl.int64)
        s = r % S
        acc += tl.load(a_ptr + row[None, :] * sar + m[:, None] * sam + s[None, :] * sas,
                       mask=m_ok[:, None] & (r < R)[None, :], other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=1)
    tl.store(out_ptr + b.to(tl.int64) * M + m, total, mask=m_ok)
    tl.atomic_add(sq_ptr + b, tl.sum(total * total, axis=0))


def group_sum(a: torch.Tensor, K: int, out: torch.Tensor | None = None,
              sqnorm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) per-group sums of a (N, M, S), into ``out``, squared norms added to ``sqnorm``."""
    check_inputs(a)
    if a.dim() != 3 or a.shape[0] % K:
        raise ValueError(f"group_sum needs a (N, M, S) tensor with N a multiple of K={K}, got {tuple(a.shape)}")
    N, M, S = a.shape
    B = N // K
    out = torch.empty(B, M, dtype=torch.float32, device=a.device) if out is None else out
    sqnorm = torch.zeros(B, dtype=torch.float32, device=a.device) if sqnorm is None else sqnorm
    check_output(out, (B, M))
    check_output(sqnorm, (B,), "sqnorm")
    if B == 0:
        return out, sqnorm
    R = K * S
    BM, BR = block(M, lo=1, hi=32), block(R, lo=1, hi=128)
    _group_sum_kernel[(triton.cdiv(M, BM), B)](a, out, sqnorm, K, M, S, R, *a.stride(), BM=BM, BR=BR)
    return out, sqnorm


def reference_group_sum(a: torch.Tensor, K: int) -> torch.Tensor:
    N, M, S = a.shape
    return a.float().reshape(N // K, K, M, S).sum(dim=(1, 3))
