import torch
import torch.nn as nn

from . import groups, register_rule


@register_rule(nn.Conv2d)
def conv2d_rule(module: nn.Conv2d, inputs: tuple, g: torch.Tensor, K: int) -> dict:
    """All B per-group weight gradients as ONE grouped-convolution weight gradient.

    The K rows of a group become the batch and the B groups become convolution groups
    (channels (K, B*C, H, W)), so the sum over K happens inside the convolution kernel and its
    cost is close to the ordinary weight gradient's.
    """
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"Conv2d with padding_mode={module.padding_mode!r} has no per-group rule")
    x = inputs[0]
    B = x.shape[0] // K
    out = {}
    gg = groups(g, K)                                                        # (B, K, O, Ho, Wo)
    if module.weight.requires_grad and B == 0:
        out["weight"] = x.new_zeros(0, *module.weight.shape)
    elif module.weight.requires_grad:
        C, O = x.shape[1], g.shape[1]
        xk = groups(x, K).transpose(0, 1).reshape(K, B * C, *x.shape[2:])   # (K, B*C, H, W)
        gk = gg.transpose(0, 1).reshape(K, B * O, *g.shape[2:])             # (K, B*O, Ho, Wo)
        padding = module.padding if not isinstance(module.padding, str) else _explicit_padding(module)
        w = torch.nn.grad.conv2d_weight(xk, (B * O, C // module.groups, *module.kernel_size), gk,
                                        stride=module.stride, padding=padding, dilation=module.dilation,
                                        groups=B * module.groups)
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
