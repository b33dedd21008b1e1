"""Building blocks of the DDPM++ network, named and shaped as in the published DPDM code.

Parameter names (``GroupNorm_0``, ``Conv_0``, ``NIN_0.W``, ...) are part of the checkpoint
format: do not rename them. No block modifies an activation in place, so autograd hooks
(which the DP engine relies on) see every intermediate tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def variance_scaling_(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's ``default_init``: uniform 'fan_avg' variance scaling (scale 0 means 1e-10)."""
    scale = 1e-10 if scale == 0 else scale
    shape = tensor.shape
    receptive = math.prod(shape[2:]) if tensor.dim() > 2 else 1
    fan_avg = (shape[0] + shape[1]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def conv2d(in_ch: int, out_ch: int, kernel_size: int = 3, init_scale: float = 1.0) -> nn.Conv2d:
    """A 'same' convolution with DDPM initialisation (zero bias)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    variance_scaling_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise level (score-SDE ``get_timestep_embedding``), in float32."""
    if c_noise.dim() != 1:
        raise ValueError(f"c_noise must be 1-D (one value per row), got shape {tuple(c_noise.shape)}")
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=c_noise.device) * (-math.log(max_positions) / (half - 1))
    )
    args = c_noise.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of log(sigma) (``embedding_type='fourier'``); W is fixed."""

    def __init__(self, embedding_size: int, scale: float = 16.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class NIN(nn.Module):
    """1x1 'network-in-network' projection over channels: y[b,:,h,w] = x[b,:,h,w] @ W + b.

    Kept as its own module type (weight ``W`` of shape (in, out)) because the checkpoint
    stores it that way and the DP engine has a per-layer rule for it.
    """

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(variance_scaling_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bchw,co->bohw", x, self.W)
        return y + self.b[None, :, None, None]


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (``AttnBlockpp``)."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        logits = torch.einsum("bcn,bcm->bnm", q.reshape(B, C, H * W), k.reshape(B, C, H * W)) * C**-0.5
        attn = torch.softmax(logits, dim=-1)
        h = torch.einsum("bnm,bcm->bcn", attn, v.reshape(B, C, H * W)).reshape(B, C, H, W)
        h = self.NIN_3(h)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample_mean(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block with optional 2x up/down-sampling and a noise-embedding bias."""

    def __init__(self, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.0,
                 skip_rescale: bool = True, init_scale: float = 0.0, act: nn.Module | None = None):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv2d(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv2d(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv2d(in_ch, out_ch, kernel_size=1)
        self.act = act if act is not None else nn.SiLU()
        self.up, self.down, self.skip_rescale = up, down, skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_mean(h), downsample_mean(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h
