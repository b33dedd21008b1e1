"""The CUDA backend: the CUDA C++ twins in ``csrc/``. The clip/sum/noise pass is here; the per-group
conv weight gradient is capture's kernel rule for the name ``"cuda"`` (it calls ``backend.ext``).
Other layers use their torch rules (Triton's kernels are the ``"triton"`` backend)."""
from __future__ import annotations

import torch

from .fused import FusedBackend


class CudaBackend(FusedBackend):
    name = "cuda"

    def __init__(self, device: torch.device):
        super().__init__()
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' runs CUDA kernels, but the model is on {device.type} (no GPU here, "
                               "or the model was not moved to one before make_private): use backend='torch' on a CPU")
        from dpdm_fast import csrc
        self.ext = csrc.load()
        self.tile = self.ext.clip_reduce_tile()

    def _launch(self, buffer, numels, written, norms, max_norm, scale, total, tiles, final, std, divisor, seed,
                draws, out, bounds=None) -> None:   # (no per-layer kernel: bounds is always None here)
        self.ext.clip_reduce(buffer, norms.float().contiguous(), written, tiles, total, out, float(max_norm),
                             float(scale), float(std), float(divisor), int(seed), int(draws), bool(final))
