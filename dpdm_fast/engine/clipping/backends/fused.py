"""What the Triton and CUDA backends share: the clip/sum/noise pass as one launch over the buffer."""
from __future__ import annotations

import torch

from ...profiling import profile_scope
from .jobs import ClipJob, Noise
from .torch_backend import TorchBackend, noise_seed


class FusedBackend(TorchBackend):
    """A backend whose ``reduce`` is one kernel over the per-example buffer (``_launch``): clip factors
    from the norms, the weighted sum over examples, and in a step's final pass the Philox noise and
    the division by the expected batch size, written into the flat gradient the ``.grad`` views use."""
    tile: int = 1024
    per_layer_kernel = False   # whether ``_launch`` takes per-layer bounds (else the torch reference sums those)

    def __init__(self):
        self._tiles: dict = {}    # id(layout) -> (layout, parameter sizes, its tile table on the device)

    def tile_table(self, numels: list, device: torch.device) -> torch.Tensor:
        from dpdm_fast.kernels.tiles import tile_table   # (no Triton import: the CUDA backend needs no Triton)
        return tile_table(numels, device, self.tile)

    def _launch(self, buffer, numels, written, norms, max_norm, scale, total, tiles, final, std, divisor, seed,
                draws, out, bounds=None) -> None:
        raise NotImplementedError

    def reduce(self, job: ClipJob | None, total: torch.Tensor, noise: Noise | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        if job is not None and job.B == 0:
            job = None
        if job is not None and job.layer_bounds is not None and not self.per_layer_kernel:
            # per-layer clip factors without a kernel for them: the reference's block-by-block sum, then this
            # backend's noise pass
            total = TorchBackend.reduce(self, job, total)
            job = None
        if job is None and noise is None:
            return total
        device = total.device
        if job is None:  # nothing left in the buffer: noise, scale and hand out only
            numels = [total.numel()]
            buffer, written, norms = total, torch.zeros(1, dtype=torch.int32, device=device), total.new_zeros(1)
            max_norm, scale, tiles = 1.0, 0.0, self.tile_table(numels, device)
        else:
            numels, tiles = self._layout_tiles(job.layout, device)
            buffer, norms, max_norm, scale = job.storage, job.norms, job.max_grad_norm, job.scale
            written = torch.tensor(job.written, dtype=torch.int32).to(device, non_blocking=True)
        bounds = None
        if job is not None and job.layer_bounds is not None:   # the (params, B) norm table and one bound each
            norms, bounds = job.param_norms, job.layer_bounds
        std, divisor, seed, draws, final = 0.0, 1.0, 0, 1, noise is not None
        if final:
            std, divisor, draws = noise.std, noise.divisor, 4 if noise.secure_mode else 1
            seed = noise_seed(noise.generator, device) if noise.std else 1 << 62
            out = torch.empty_like(total) if out is None else out
        with profile_scope("dpdm_fast.clip_sum_noise" if final else "dpdm_fast.clip_sum"):
            self._launch(buffer, numels, written, norms, max_norm, scale, total, tiles, final, std, divisor, seed,
                         draws, out if final else total, bounds)
        return out if final else total

    def _layout_tiles(self, layout, device) -> tuple[list, torch.Tensor]:
        """(parameter sizes, tile table) of a layout, built once (the layout is fixed at wrap time)."""
        if id(layout) not in self._tiles:
            numels = [p.numel() for p in layout.params]
            self._tiles[id(layout)] = (layout, numels, self.tile_table(numels, device))
        return self._tiles[id(layout)][1:]
