"""Per-group GroupNorm affine gradients with their squared norms.

For group b: weight grad[c] = sum over its K rows and positions of g * (x - mean) * rstd, bias
grad[c] = sum of g, with mean / rstd the per-(row, norm group) statistics of the forward (GroupNorm
keeps them for its own backward, so they are not recomputed). Each written row of ``out_w`` /
``out_b`` adds its squared norm to ``sq_w[b]`` / ``sq_b[b]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, check_inputs, check_output


@triton.jit
def _group_norm_grad_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sqw_ptr, sqb_ptr,
                            K, C, S, G, CPG, sxr, sxc, sxs, sgr, sgc, sgs,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    ch = pid_c * BC + tl.arange(0, BC)
    c_ok = ch < C
    grp = ch // CPG
    acc_w = tl.zeros((BC, BS), dtype=tl.float32)
    acc_b = tl.zeros((BC, BS), dtype=tl.float32)
    for k in range(K):
        row = (b * K + k).to(tl.int64)
        mu = tl.load(mean_ptr + row * G + grp, mask=c_ok, other=0.0)
        rs = tl.load(rstd_ptr + row * G + grp, mask=c_ok, other=0.0)
        for s0 in range(0, S, BS):
            s = s0 + tl.arange(0, BS)
            ok = c_ok[:, None] & (s < S)[None, :]
            gv = tl.load(g_ptr + row * sgr + ch[:, None] * sgc + s[None, :] * sgs, mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                xv = tl.load(x_ptr + row * sxr + ch[:, None] * sxc + s[None, :] * sxs, mask=ok, other=0.0)
                acc_w += gv * ((xv.to(tl.float32) - mu[:, None]) * rs[:, None])
            if HAS_B:
                acc_b += gv
    if HAS_W:
        dw = tl.sum(acc_w, axis=1)
        tl.store(w_ptr + b.to(tl.int64) * C + ch, dw, mask=c_ok)
        tl.atomic_add(sqw_ptr + b, tl.sum(dw * dw, axis=0))
    if HAS_B:
        db = tl.sum(acc_b, axis=1)
        tl.store(b_ptr + b.to(tl.int64) * C + ch, db, mask=c_ok)
        tl.atomic_add(sqb_ptr + b, tl.sum(db * db, axis=0))


def group_norm_grad(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, K: int,
                    out_w: torch.Tensor | None, out_b: torch.Tensor | None,
                    sq_w: torch.Tensor | None = None, sq_b: torch.Tensor | None = None) -> None:
    """Per-group (B, C) weight / bias gradients of GroupNorm into out_w / out_b (either may be None).

    x, g: (N, C, S) (any strides); mean, rstd: (N, G) fp32 statistics of the forward.
    """
    check_inputs(x, g)
    N, C, S = x.shape
    G = mean.shape[-1]
    if N % K or C % G or g.shape != x.shape or mean.numel() != N * G or rstd.numel() != N * G:
        raise ValueError(f"shapes do not fit a GroupNorm gradient: x {tuple(x.shape)}, g {tuple(g.shape)}, "
                         f"mean {tuple(mean.shape)}, rstd {tuple(rstd.shape)}, K={K}")
    B = N // K
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    for t, name in ((out_w, "out_w"), (out_b, "out_b")):
        if t is not None:
            check_output(t, (B, C), name)
    for t, name in ((sq_w, "sq_w"), (sq_b, "sq_b")):
        if t is not None:
            check_output(t, (B,), name)
    if B == 0 or (out_w is None and out_b is None):
        return
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    sq_w = torch.zeros(B, dtype=torch.float32, device=x.device) if sq_w is None else sq_w
    sq_b = torch.zeros(B, dtype=torch.float32, device=x.device) if sq_b is None else sq_b
    BC, BS = block(C, lo=1, hi=16), block(S, lo=1, hi=128)
    _group_norm_grad_kernel[(triton.cdiv(C, BC), B)](
        x, g, mean, rstd, dummy if out_w is None else out_w, dummy if out_b is None else out_b, sq_w, sq_b,
        K, C, S, G, C // G, *x.stride(), *g.stride(), HAS_W=out_w is not None, HAS_B=out_b is not None, BC=BC, BS=BS)


def reference_group_norm_grad(x: torch.Tensor, g: torch.Tensor, num_groups: int, eps: float, K: int):
    """What the kernel computes, from scratch in fp32: (B, C) weight and bias gradients."""
    N, C = x.shape[:2]
    x, g = x.float().reshape(N, C, -1), g.float().reshape(N, C, -1)
    xg = x.reshape(N, num_groups, -1)
    x_hat = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)).reshape_as(x)
    dw = (g * x_hat).sum(-1).reshape(N // K, K, C).sum(1)
    db = g.sum(-1).reshape(N // K, K, C).sum(1)
    return dw, db
