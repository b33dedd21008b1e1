"""Conv1d and Conv3d, and the n-d weight-gradient paths ConvTranspose2d shares (``conv_transpose.py``).

Conv1d runs as a Conv2d of height 1 through ``conv.py``'s autotuned paths (grouped, loop, unfold,
rows). Conv3d (and transposed convolutions) use the same ideas with ``aten.convolution_backward``,
the op autograd itself uses for a convolution's weight gradient: one grouped call with the K rows of
an example as its batch and the B examples as convolution groups, a loop over examples, and (K > 1)
per-row gradients by one grouped call then summed over each example's K rows.

Padding is applied as the module's ``_conv_forward`` does: ``padding_mode`` other than 'zeros'
pads the input with ``F.pad(..., mode=padding_mode)`` first, and an asymmetric ``padding='same'``
(even kernel extent) is padded explicitly, the extra on the right as PyTorch does.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...profiling import profile_scope
from ..autotune import batch_bucket, run_fastest
from .conv import UNFOLD_MAX_BYTES, conv_input_and_padding, path_key as conv2d_path_key
from .conv import weight_paths as conv2d_weight_paths
from .registry import block, groups, register_rule


def weight_grad(x, g, shape, stride, padding, dilation, groups, transposed=False, output_padding=None):
    """The weight gradient of one (transposed) convolution of input x with output gradient g, by the op
    autograd uses (only the weight's shape is read: a broadcast 1-element tensor stands in for it)."""
    w = g.new_empty(1).expand(tuple(shape))
    op = tuple(output_padding) if output_padding is not None else (0,) * len(stride)
    return torch.ops.aten.convolution_backward(g, x, w, None, tuple(stride), tuple(padding), tuple(dilation),
                                               transposed, op, groups, (False, True, False))[1]


def nd_weight_paths(x, g, shape, K, w, **kw) -> dict:
    """{name: () -> (B, *shape) per-group weight gradients} (into the buffer block w when given).
    ``kw``: stride, padding, dilation, groups, transposed, output_padding."""
    paths = {"grouped": lambda: _into(w, _grouped(x, g, shape, K, **kw)),
             "loop": lambda: _loop(x, g, shape, K, w, **kw)}
    if K > 1 and x.shape[0] * math.prod(shape) * x.element_size() <= UNFOLD_MAX_BYTES:
        paths["rows"] = lambda: _rows(x, g, shape, K, w, **kw)
    return paths


def nd_path_key(x, g, shape, K, **kw) -> tuple:
    return (x.device.type, x.dtype, batch_bucket(x.shape[0] // K), K, tuple(x.shape[1:]), tuple(g.shape[1:]),
            tuple(shape), *(tuple(v) if isinstance(v, (tuple, list)) else v for _, v in sorted(kw.items())))


def _into(w, t):
    if w is None:
        return t
    with profile_scope("dpdm_fast.buffer_copy"):  # counted with the engine's other copies
        return w.copy_(t)


def _grouped(x, g, shape, K, groups, **kw):
    """One call: the K rows of an example are the batch, the B examples B*groups convolution groups.
    Stacking B copies of the weight along its dim 0 fits both layouts ((O, C/g, ...) for a
    convolution, (C, O/g, ...) for a transposed one): dim 0 is split into the groups in both."""
    B = x.shape[0] // K
    xk = x.reshape(B, K, *x.shape[1:]).transpose(0, 1).reshape(K, B * x.shape[1], *x.shape[2:])
    gk = g.reshape(B, K, *g.shape[1:]).transpose(0, 1).reshape(K, B * g.shape[1], *g.shape[2:])
    out = weight_grad(xk, gk, (B * shape[0], *shape[1:]), groups=B * groups, **kw)
    return out.reshape(B, *shape)


def _loop(x, g, shape, K, w, **kw):
    """One ordinary weight gradient per example, over its K contiguous rows (into w if given)."""
    B = x.shape[0] // K
    w = x.new_empty(B, *shape, dtype=g.dtype) if w is None else w
    for b in range(B):
        w[b] = weight_grad(x[b * K:(b + 1) * K], g[b * K:(b + 1) * K], shape, **kw)
    return w


def _rows(x, g, shape, K, w, groups, **kw):
    """Every row its own group (no transposed copies of x and g), then the sum over each example's K rows."""
    N = x.shape[0]
    per_row = weight_grad(x.reshape(1, N * x.shape[1], *x.shape[2:]), g.reshape(1, N * g.shape[1], *g.shape[2:]),
                          (N * shape[0], *shape[1:]), groups=N * groups, **kw)
    return torch.sum(per_row.view(N // K, K, *shape), dim=1, out=w)


def _bias(g: torch.Tensor, K: int, out: dict | None) -> torch.Tensor:
    return torch.sum(groups(g, K), dim=(1, *range(3, g.dim() + 1)), out=block(out, "bias"))


def conv_grads(module, g: torch.Tensor, K: int, out: dict | None, weight) -> dict:
    """The per-group gradients of a convolution's trainable parameters: ``weight(block)`` computes the weight's
    (into the buffer block when given), the bias is the sum of g over each group's rows and positions."""
    B = g.shape[0] // K
    groups(g, K)                                          # checks the rows are a multiple of K
    res = {}
    if module.weight.requires_grad:
        res["weight"] = g.new_zeros(0, *module.weight.shape) if B == 0 else weight(block(out, "weight"))
    if module.bias is not None and module.bias.requires_grad:
        res["bias"] = _bias(g, K, out)
    return res


@register_rule(nn.Conv1d, methods=("forward", "_conv_forward"), input_ndim=lambda d: d == 3)
def conv1d_rule(module: nn.Conv1d, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """As a Conv2d of height 1 (``conv.py``'s autotuned exact paths, keyed 'conv1d')."""
    def weight(w):
        x, padding = conv_input_and_padding(module, inputs[0])
        shape = module.weight.shape
        x4, g4, shape4 = x.unsqueeze(2), g.unsqueeze(2), torch.Size((shape[0], shape[1], 1, shape[2]))
        w4 = None if w is None else w.view(-1, *shape4)
        kw = dict(stride=(1, module.stride[0]), padding=(0, padding[0]), dilation=(1, module.dilation[0]),
                  groups=module.groups)
        paths = conv2d_weight_paths(x4, g4, shape4, K, w4, **kw)
        return run_fastest("conv1d", conv2d_path_key(x4, g4, shape4, K, **kw), paths, x.device).view(-1, *shape)
    return conv_grads(module, g, K, out, weight)


def nd_conv_grads(module, x: torch.Tensor, g: torch.Tensor, K: int, out: dict | None, key: str, **kw) -> dict:
    """Per-group weight (the autotuned n-d paths, keyed ``key``) and bias gradients of an n-d convolution
    or transposed convolution, x already padded as its forward pads it. ``kw``: see ``nd_weight_paths``."""
    shape = module.weight.shape
    return conv_grads(module, g, K, out, lambda w: run_fastest(key, nd_path_key(x, g, shape, K, **kw),
                                                               nd_weight_paths(x, g, shape, K, w, **kw), x.device))


@register_rule(nn.Conv3d, methods=("forward", "_conv_forward"), input_ndim=lambda d: d == 5)
def conv3d_rule(module: nn.Conv3d, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """Per-group weight gradients with the sum over K inside the convolution (autotuned, keyed 'conv3d')."""
    x, padding = conv_input_and_padding(module, inputs[0])
    return nd_conv_grads(module, x, g, K, out, "conv3d", stride=tuple(module.stride), padding=padding,
                         dilation=tuple(module.dilation), groups=module.groups)
