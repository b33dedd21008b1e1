import torch
import torch.nn as nn

from .conv_nd import nd_conv_grads
from .registry import register_rule


def _check_conv_transpose(module: nn.ConvTranspose2d) -> None:
    if module.padding_mode != "zeros":
        raise NotImplementedError("ConvTranspose2d supports only padding_mode='zeros' (its forward refuses others)")


def output_padding_of(x: torch.Tensor, g: torch.Tensor, module: nn.ConvTranspose2d) -> tuple:
    """The output padding the forward used, read off the shapes (so ``output_size=`` needs no special case)."""
    return tuple(go - ((xi - 1) * s - 2 * p + d * (k - 1) + 1)
                 for xi, go, s, p, d, k in zip(x.shape[2:], g.shape[2:], module.stride, module.padding,
                                               module.dilation, module.kernel_size))


@register_rule(nn.ConvTranspose2d, check=_check_conv_transpose, input_ndim=lambda d: d == 4)
def conv_transpose2d_rule(module: nn.ConvTranspose2d, inputs: tuple, g: torch.Tensor, K: int,
                          out: dict | None = None) -> dict:
    """Per-group weight gradients of a transposed convolution: ``aten.convolution_backward(transposed=True)``
    (autograd's own op; it is the convolution weight gradient with input and output gradient swapped)
    on the grouped / loop / rows paths of ``conv_nd.py``, autotuned (keyed 'conv_transpose2d').
    A second positional argument (``output_size``) only fixes the output padding, read off g's shape."""
    x = inputs[0]
    return nd_conv_grads(module, x, g, K, out, "conv_transpose2d", stride=tuple(module.stride),
                         padding=tuple(module.padding), dilation=tuple(module.dilation), groups=module.groups,
                         transposed=True, output_padding=output_padding_of(x, g, module))
