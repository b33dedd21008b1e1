"""The Triton backend: fused kernels for the per-group gradients and the clip/sum/noise pass."""
from __future__ import annotations

import torch

from .backends import ClipJob, Noise, TorchBackend, noise_seed
from .collector import profile_scope
from .kernel_rules import triton_kernel_rules


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, device: torch.device):
        from dpdm_fast.kernels import clip_noise
        interpreted = type(clip_noise._clip_reduce_kernel).__name__ == "InterpretedFunction"
        if device.type == "cpu" and not interpreted:
            raise RuntimeError("dpdm_fast.kernels was imported without TRITON_INTERPRET=1, so its kernels cannot "
                               "run on CPU tensors: set TRITON_INTERPRET=1 before importing dpdm_fast")
        if device.type == "cuda" and interpreted:
            raise RuntimeError("TRITON_INTERPRET=1 is set, so the Triton kernels would run in the (slow) CPU "
                               "interpreter instead of on the GPU: unset it for GPU training")
        self._clip_noise = clip_noise
        self.kernel_rules = triton_kernel_rules()
        self._tiles: dict = {}    # layout id -> its tile table on the device

    def reduce(self, job: ClipJob | None, total: torch.Tensor, noise: Noise | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """One kernel over the buffer: clip factors from the norms, the weighted sum over examples, and
        (final pass of a step) Philox noise and the division by the expected batch size into ``out``."""
        if job is None or job.B == 0:
            if noise is None:
                return total
            job = None
        layout = job.layout if job is not None else None
        if noise is not None and out is None:
            out = torch.empty_like(total)
        with profile_scope("dpdm_fast.clip_sum" if noise is None else "dpdm_fast.clip_sum_noise"):
            if layout is None:  # nothing left in the buffer: noise, scale and hand out only
                written, norms, B, storage = total.new_zeros(1, dtype=torch.int32), total.new_zeros(1), 0, total
                numels, tiles = [total.numel()], None
            else:
                written = torch.tensor(job.written, dtype=torch.int32).to(total.device, non_blocking=True)
                norms, B, storage = job.norms, job.B, job.storage
                numels, tiles = [p.numel() for p in layout.params], self._tile_table(layout, total.device)
            kw = {}
            if noise is not None:
                kw = dict(final=True, std=noise.std, divisor=noise.divisor, draws=4 if noise.secure_mode else 1,
                          seed=noise_seed(noise.generator, total.device) if noise.std else 0, out=out)
            return self._clip_noise.clip_reduce(storage, numels, written, norms[:B] if B else norms,
                                                job.max_grad_norm if job else 1.0, job.scale if job else 0.0,
                                                total, tiles=tiles, **kw)

    def _tile_table(self, layout, device) -> torch.Tensor:
        key = id(layout)
        if key not in self._tiles:
            self._tiles[key] = (layout, self._clip_noise.tile_table([p.numel() for p in layout.params], device))
        return self._tiles[key][1]
