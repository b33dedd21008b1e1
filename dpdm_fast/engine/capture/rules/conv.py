import torch
import torch.nn as nn

import torch.nn.functional as F

from ..autotune import batch_bucket, run_fastest
from ...profiling import profile_scope
from .registry import block, groups, register_rule


# Memory cap for the unfold path's column buffer (rows x C*k*k x output pixels floats) and the rows
# path's per-row gradients (rows x weight size): each is a candidate only where its temporary fits,
# so autotuning never allocates a huge one.
UNFOLD_MAX_BYTES = 256 * 2**20


def _check_conv(module: nn.Conv2d) -> None:
    if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise NotImplementedError(f"Conv2d with padding_mode={module.padding_mode!r} has no per-group rule")


@register_rule(nn.Conv2d, methods=("forward", "_conv_forward"), check=_check_conv, input_ndim=lambda d: d == 4)
def conv2d_rule(module: nn.Conv2d, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """Per-group weight gradients with the sum over K inside the convolution or GEMM.

    Exact paths, the fastest for the shape chosen by a one-time measurement (``engine/autotune.py``):
    one grouped-convolution weight gradient (the K rows of an example are its batch), a loop of
    ordinary weight gradients over each example's K rows, unfold + one batched GEMM, and (K > 1,
    small weights) per-row gradients by one grouped call without transposing the activations, then
    summed over each example's K rows.
    """
    x, padding = conv_input_and_padding(module, inputs[0])   # (non-zero padding modes pad the input first)
    B = x.shape[0] // K
    res = {}
    gg = groups(g, K)                                                        # (B, K, O, Ho, Wo)
    if module.weight.requires_grad and B == 0:
        res["weight"] = x.new_zeros(0, *module.weight.shape)
    elif module.weight.requires_grad:
        kw = dict(stride=module.stride, padding=padding, dilation=module.dilation, groups=module.groups)
        shape = module.weight.shape
        paths = weight_paths(x, g, shape, K, block(out, "weight"), **kw)
        res["weight"] = run_fastest("conv2d", path_key(x, g, shape, K, **kw), paths, x.device)
    if module.bias is not None and module.bias.requires_grad:
        res["bias"] = torch.sum(gg, dim=(1, 3, 4), out=block(out, "bias"))
    return res


def weight_paths(x, g, shape, K, w, stride, padding, dilation, groups) -> dict:
    """The exact paths for this call, {name: () -> (B, *shape) per-group weight gradients}. Every one
    delivers into the buffer block w (the grouped one by a copy), so that the autotune times what
    each path really costs in the step."""
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    paths = {"grouped": lambda: _into(w, _grouped(x, g, shape, K, **kw)),
             "loop": lambda: _loop(x, g, shape, K, w, **kw)}
    if groups == 1 and x.shape[0] * shape[1] * shape[2] * shape[3] * g.shape[2] * g.shape[3] * 4 <= UNFOLD_MAX_BYTES:
        paths["unfold"] = lambda: _unfold(x, g, shape, K, w, **kw)
    if K > 1 and x.shape[0] * shape.numel() * 4 <= UNFOLD_MAX_BYTES:
        paths["rows"] = lambda: _rows(x, g, shape, K, w, **kw)
    return paths


def path_key(x, g, shape, K, stride, padding, dilation, groups) -> tuple:
    """The autotune's cache key: the shapes and options that decide which path is fastest."""
    return (x.device.type, x.dtype, batch_bucket(x.shape[0] // K), K, tuple(x.shape[1:]), tuple(g.shape[1:]),
            tuple(shape), tuple(stride), tuple(padding), tuple(dilation), groups)


def conv_padding(module: nn.Conv2d) -> tuple | None:
    """The conv's symmetric zero padding as numbers ('same' / 'valid' resolved); None when the padding is
    not that (another padding mode, or an asymmetric 'same'): the fused kernels do not cover it."""
    if module.padding_mode != "zeros":
        return None
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def conv_input_and_padding(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple:
    """(input the convolution runs on, its remaining symmetric zero padding), as ``_conv_forward`` has them."""
    nd = x.dim() - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if module.padding == "valid":
        return x, (0,) * nd
    if module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        if all(t % 2 == 0 for t in totals):
            return x, tuple(t // 2 for t in totals)
        pad = []
        for t in reversed(totals):            # F.pad lists the last dim first; the extra goes on the right
            pad += [t // 2, t - t // 2]
        return F.pad(x, pad), (0,) * nd
    return x, tuple(module.padding)



def _into(w: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    if w is None:
        return t
    with profile_scope("dpdm_fast.buffer_copy"):  # counted with the engine's other copies
        return w.copy_(t)


def _grouped(x, g, shape, K, stride, padding, dilation, groups):
    """One weight gradient of a grouped convolution: the K rows of a group are its batch, the B
    groups its convolution groups (channels (K, B*C, H, W))."""
    B, C, O = x.shape[0] // K, x.shape[1], g.shape[1]
    xk = x.reshape(B, K, C, *x.shape[2:]).transpose(0, 1).reshape(K, B * C, *x.shape[2:])
    gk = g.reshape(B, K, O, *g.shape[2:]).transpose(0, 1).reshape(K, B * O, *g.shape[2:])
    w = torch.nn.grad.conv2d_weight(xk, (B * O, C // groups, *shape[2:]), gk, stride=stride, padding=padding,
                                    dilation=dilation, groups=B * groups)
    return w.reshape(B, *shape)


def _loop(x, g, shape, K, w, stride, padding, dilation, groups):
    """One ordinary weight gradient per example, over its K contiguous rows (into w if given)."""
    B = x.shape[0] // K
    w = x.new_empty(B, *shape, dtype=g.dtype) if w is None else w
    for b in range(B):
        w[b] = torch.nn.grad.conv2d_weight(x[b * K:(b + 1) * K], shape, g[b * K:(b + 1) * K], stride=stride,
                                           padding=padding, dilation=dilation, groups=groups)
    return w


def _unfold(x, g, shape, K, w, stride, padding, dilation, groups):
    """im2col, then per example (O, K*L) @ (K*L, C*kh*kw): one batched GEMM (groups == 1 only)."""
    B, O = x.shape[0] // K, g.shape[1]
    cols = F.unfold(x, shape[2:], dilation=dilation, padding=padding, stride=stride)     # (N, C*kh*kw, L)
    L = cols.shape[-1]
    cols = cols.reshape(B, K, -1, L).transpose(1, 2).reshape(B, -1, K * L)               # (B, C*kh*kw, K*L)
    gl = g.reshape(B, K, O, L).transpose(1, 2).reshape(B, O, K * L)                       # (B, O, K*L)
    return torch.bmm(gl, cols.transpose(1, 2), out=None if w is None else w.view(B, O, -1)).view(B, *shape)


def _rows(x, g, shape, K, w, stride, padding, dilation, groups):
    """One grouped call with every row its own group (views of x and g, no transposed copies as in
    ``_grouped``), then the sum over each example's K rows: B*K weight-sized temporaries, which for
    3x3 kernels on large maps is less memory traffic than transposing the activations."""
    N, C, O = x.shape[0], x.shape[1], g.shape[1]
    per_row = torch.nn.grad.conv2d_weight(x.reshape(1, N * C, *x.shape[2:]), (N * O, C // groups, *shape[2:]),
                                          g.reshape(1, N * O, *g.shape[2:]), stride=stride, padding=padding,
                                          dilation=dilation, groups=N * groups)
    return torch.sum(per_row.view(N // K, K, *shape), dim=1, out=w)
