"""The Triton backend: the clip/sum/noise pass as one Triton kernel (its per-group gradient kernels are
capture's kernel rules for the name ``"triton"``)."""
from __future__ import annotations

import torch

from .fused import FusedBackend


class TritonBackend(FusedBackend):
    name = "triton"

    def __init__(self, device: torch.device):
        super().__init__()
        from dpdm_fast.kernels import clip_noise
        interpreted = type(clip_noise._clip_reduce_kernel).__name__ == "InterpretedFunction"
        if device.type == "cpu" and not interpreted:
            raise RuntimeError("dpdm_fast.kernels was imported without TRITON_INTERPRET=1, so its kernels cannot "
                               "run on CPU tensors: set TRITON_INTERPRET=1 before importing dpdm_fast")
        if device.type == "cuda" and interpreted:
            raise RuntimeError("TRITON_INTERPRET=1 is set, so the Triton kernels would run in the (slow) CPU "
                               "interpreter instead of on the GPU: unset it for GPU training")
        self._clip_noise = clip_noise
        self.tile = clip_noise.TILE

    per_layer_kernel = True

    def _launch(self, buffer, numels, written, norms, max_norm, scale, total, tiles, final, std, divisor, seed,
                draws, out, bounds=None) -> None:
        self._clip_noise.clip_reduce(buffer, numels, written, norms, max_norm, scale, total, tiles=tiles,
                                     final=final, std=std, divisor=divisor, seed=seed, draws=draws, out=out,
                                     bounds=bounds)
