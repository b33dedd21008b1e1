import torch
import torch.nn as nn

from . import groups, register_rule


# On CPU, for large feature maps, B convolution weight-gradients over each example's K contiguous rows
# beat one grouped call (which needs two transposed copies of the activations); measured on 2 cores,
# N=128 rows: 28x28x32ch 15 ms (loop) vs 27 ms (grouped) vs 32 ms (ordinary weight grad); at 7x7 the
# grouped call wins (5.0 vs 5.9 ms). On GPUs one grouped call is always preferred (one launch).
LOOP_MIN_PIXELS = 256


def _check_conv(module: nn.Conv2d) -> None:
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"Conv2d with padding_mode={module.padding_mode!r} has no per-group rule "
                                  "(only 'zeros'); pad the input explicitly with F.pad instead")
    if isinstance(module.padding, str):
        _explicit_padding(module)


@register_rule(nn.Conv2d, methods=("forward", "_conv_forward"), check=_check_conv, input_ndim=lambda d: d == 4)
def conv2d_rule(module: nn.Conv2d, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """Per-group weight gradients with the sum over K inside the convolution kernel.

    Either ONE grouped-convolution weight gradient (the K rows of a group as the batch, the B groups
    as convolution groups: channels (K, B*C, H, W)), or, on CPU for large maps, one ordinary weight
    gradient per group over its K contiguous rows. Neither materialises per-row gradients.
    """
    x = inputs[0]
    B = x.shape[0] // K
    out = {}
    gg = groups(g, K)                                                        # (B, K, O, Ho, Wo)
    if module.weight.requires_grad and B == 0:
        out["weight"] = x.new_zeros(0, *module.weight.shape)
    elif module.weight.requires_grad:
        padding = module.padding if not isinstance(module.padding, str) else _explicit_padding(module)
        kw = dict(stride=module.stride, padding=padding, dilation=module.dilation)
        C, O = x.shape[1], g.shape[1]
        if x.device.type == "cpu" and x.shape[2] * x.shape[3] >= LOOP_MIN_PIXELS:
            w = x.new_empty(B, *module.weight.shape, dtype=g.dtype)
            for b in range(B):
                w[b] = torch.nn.grad.conv2d_weight(x[b * K:(b + 1) * K], module.weight.shape, g[b * K:(b + 1) * K],
                                                   groups=module.groups, **kw)
            out["weight"] = w
        else:
            xk = groups(x, K).transpose(0, 1).reshape(K, B * C, *x.shape[2:])   # (K, B*C, H, W)
            gk = gg.transpose(0, 1).reshape(K, B * O, *g.shape[2:])             # (K, B*O, Ho, Wo)
            w = torch.nn.grad.conv2d_weight(xk, (B * O, C // module.groups, *module.kernel_size), gk,
                                            groups=B * module.groups, **kw)
            out["weight"] = w.reshape(B, O, C // module.groups, *module.kernel_size)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = gg.sum(dim=(1, 3, 4))
    return out


def _explicit_padding(module: nn.Conv2d) -> tuple:
    if module.padding == "valid":
        return (0, 0)
    # 'same' (stride 1): total padding dilation*(k-1), PyTorch puts the extra on the right/bottom
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotImplementedError("Conv2d padding='same' with an asymmetric padding has no per-group rule")
        pads.append(total // 2)
    return tuple(pads)
