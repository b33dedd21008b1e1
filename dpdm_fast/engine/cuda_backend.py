"""The CUDA backend: the CUDA C++ twins in ``csrc/`` (per-group conv weight gradient, clip/sum/noise
pass). Other layers use their torch rules (Triton's kernels are the ``"triton"`` backend)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .fused_backend import FusedBackend
from .kernel_rules import plain_conv_padding


class CudaBackend(FusedBackend):
    name = "cuda"

    def __init__(self, device: torch.device):
        super().__init__()
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' runs CUDA kernels, but the model is on {device.type} (no GPU here, "
                               "or the model was not moved to one before make_private): use backend='torch' on a CPU")
        from dpdm_fast import csrc
        self._ext = csrc.load()
        self.tile = self._ext.clip_reduce_tile()
        self.kernel_rules = {nn.Conv2d: self._conv2d}

    def _launch(self, buffer, numels, written, norms, max_norm, scale, total, tiles, final, std, divisor, seed,
                draws, out) -> None:
        self._ext.clip_reduce(buffer, norms.float().contiguous(), written, tiles, total, out, float(max_norm),
                              float(scale), float(std), float(divisor), int(seed), int(draws), bool(final))

    def _conv2d(self, module: nn.Conv2d, x, g, K, out, sq, saved=None) -> bool:
        padding = plain_conv_padding(module, x)
        if padding is None or x.dtype != g.dtype:
            return False
        if "weight" in out:
            self._ext.conv2d_weight_grad(x, g, K, list(module.weight.shape), list(module.stride), list(padding),
                                         out["weight"], sq["weight"])
        if "bias" in out:
            torch.sum(g.reshape(g.shape[0] // K, K, g.shape[1], -1), dim=(1, 3), dtype=torch.float32, out=out["bias"])
            sq["bias"].add_(out["bias"].pow(2).sum(1))
        return True
