"""DDPM++ (NCSN++ code of Song et al.) exactly as configured by DPDM.

The modules live in one flat ``all_modules`` list in the order of the published code, so
published checkpoints load with ``strict=True``. ``forward`` walks that list in the same
order; the layout is decided once in ``__init__`` and replayed, which keeps the two in step.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .layers import (AttnBlock, GaussianFourierProjection, ResnetBlockBigGAN, conv2d, group_norm,
                     linear, timestep_embedding)

_SUPPORTED = {
    "resblock_type": ("biggan",),
    "progressive": ("none",),
    "progressive_input": ("none",),
    "embedding_type": ("positional", "fourier"),
    "nonlinearity": ("swish",),
    "fir": (False,),
    "resamp_with_conv": (True,),
    "combine_method": ("sum",),
}


class NCSNpp(nn.Module):
    """The DPDM denoising network F(x, c_noise, y).

    Arguments and defaults are those of DPDM's ``model/ncsnpp.py`` (the MNIST setting);
    only the variants DPDM trained (BigGAN blocks, no FIR, no progressive paths) are built,
    anything else is refused with a clear error.
    """

    def __init__(self, image_size: int, attn_resolutions: Sequence[int], num_in_channels: int = 1,
                 num_out_channels: int = 1, label_dim: int = 10, use_cfg: bool = True,
                 ch_mult: Sequence[int] = (1, 2, 2), nf: int = 32, num_res_blocks: int = 2,
                 dropout: float = 0.0, resamp_with_conv: bool = True, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True,
                 resblock_type: str = "biggan", progressive: str = "none",
                 progressive_input: str = "none", embedding_type: str = "positional",
                 init_scale: float = 0.0, combine_method: str = "sum", fourier_scale: float = 16.0,
                 nonlinearity: str = "swish"):
        super().__init__()
        given = dict(resblock_type=resblock_type, progressive=progressive,
                     progressive_input=progressive_input, embedding_type=embedding_type,
                     nonlinearity=nonlinearity, fir=fir, resamp_with_conv=resamp_with_conv,
                     combine_method=combine_method)
        for key, value in given.items():
            if value not in _SUPPORTED[key]:
                raise ValueError(f"NCSNpp: {key}={value!r} is not supported; DPDM's networks use "
                                 f"{_SUPPORTED[key]}")
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        if any(r * 2**i != image_size for i, r in enumerate(resolutions)):
            raise ValueError(f"image_size={image_size} must be divisible by 2**{len(ch_mult) - 1}")
        self.nf, self.embedding_type = nf, embedding_type
        self.label_dim = label_dim if label_dim > 0 else None
        self.attn_resolutions = tuple(attn_resolutions)
        self.act = nn.SiLU()

        mods: list[nn.Module] = []
        plan: list[tuple[str, int]] = []  # (what forward does, index into all_modules or -1)

        def add(kind: str, module: nn.Module | None = None) -> None:
            plan.append((kind, len(mods) if module is not None else -1))
            if module is not None:
                mods.append(module)

        embed_dim = nf
        if embedding_type == "fourier":
            add("fourier", GaussianFourierProjection(nf, fourier_scale))
            embed_dim = 2 * nf
        if self.label_dim is not None:
            add("label", nn.Embedding(label_dim + 1 if use_cfg else label_dim, embed_dim))
        add("temb0", linear(embed_dim, 4 * nf))
        add("temb1", linear(4 * nf, 4 * nf))

        def resblock(in_ch, out_ch=None, **kw):
            return ResnetBlockBigGAN(in_ch, out_ch, temb_dim=4 * nf, dropout=dropout,
                                     skip_rescale=skip_rescale, init_scale=init_scale, act=self.act, **kw)

        def attn(ch):
            return AttnBlock(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        add("conv_in", conv2d(num_in_channels, nf))
        add("push")
        skip_ch = [nf]
        ch = nf
        for level, res in enumerate(resolutions):
            for _ in range(num_res_blocks):
                add("block", resblock(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if res in self.attn_resolutions:
                    add("attn", attn(ch))
                add("push")
                skip_ch.append(ch)
            if level != len(resolutions) - 1:
                add("block", resblock(ch, down=True))
                add("push")
                skip_ch.append(ch)
        add("block", resblock(ch))
        add("attn", attn(ch))
        add("block", resblock(ch))
        for level in reversed(range(len(resolutions))):
            for _ in range(num_res_blocks + 1):
                add("up_block", resblock(ch + skip_ch.pop(), nf * ch_mult[level]))
                ch = nf * ch_mult[level]
            if resolutions[level] in self.attn_resolutions:
                add("attn", attn(ch))
            if level != 0:
                add("block", resblock(ch, up=True))
        add("norm_out", group_norm(ch))
        add("conv_out", conv2d(ch, num_out_channels, init_scale=init_scale))
        assert not skip_ch
        self.all_modules = nn.ModuleList(mods)
        self._plan = tuple(plan)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) network input, c_noise: (N,) noise conditioning, y: (N,) labels or None."""
        if self.label_dim is not None and y is None:
            raise ValueError("this network is class-conditional: pass labels y (the 'no label' "
                             f"token is {self.label_dim})")
        if self.embedding_type == "fourier":
            temb = None  # computed by the 'fourier' module from log(c_noise)
        else:
            temb = timestep_embedding(c_noise, self.nf)
        skips: list[torch.Tensor] = []
        h = x
        for kind, index in self._plan:
            module = self.all_modules[index] if index >= 0 else None
            if kind == "fourier":
                temb = module(torch.log(c_noise))
            elif kind == "label":
                temb = temb + module(y)
            elif kind == "temb0":
                temb = module(temb)
            elif kind == "temb1":
                temb = module(self.act(temb))
            elif kind == "push":
                skips.append(h)
            elif kind == "block":
                h = module(h, temb)
            elif kind == "up_block":
                h = module(torch.cat([h, skips.pop()], dim=1), temb)
            elif kind == "norm_out":
                h = self.act(module(h))
            else:  # conv_in, attn, conv_out
                h = module(h)
        return h
