"""The reference backend: the clip-weighted sum block by block, noise from ``torch.randn``."""
from __future__ import annotations

import torch

from ...profiling import profile_scope
from .jobs import ClipJob, Noise


class TorchBackend:
    """The reference: torch rules for every layer, then the clip-weighted sum block by block
    (one matrix-vector product each), noise from ``torch.randn``."""
    name = "torch"

    def norms(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) L2 norms of the rows of a (B, n) block, in fp32 (into ``out`` if given)."""
        return torch.linalg.vector_norm(buffer, dim=1, dtype=torch.float32, out=out)

    def reduce(self, job: ClipJob | None, total: torch.Tensor, noise: Noise | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        if job is not None and job.B:
            with profile_scope("dpdm_fast.clip_sum"):
                factors = job.factors()
                per_layer = factors.dim() == 2
                for i, p, blk in job.blocks():
                    f = factors[i] if per_layer else factors
                    job.layout.flat_view(total, p).view(-1).addmv_(blk.t(), f.to(blk.dtype))
        if noise is None:
            return total
        # the noise goes into the output, so ``total`` stays the clipped sum (Opacus's p.summed_grad)
        with profile_scope("dpdm_fast.grads_out"):
            out = total.clone() if out is None else out.copy_(total)
        with profile_scope("dpdm_fast.noise"):
            self.add_noise(out, noise.std, noise.generator, noise.secure_mode)
            if noise.divisor != 1:
                out.div_(noise.divisor)
        return out

    def add_noise(self, out: torch.Tensor, std: float, generator: torch.Generator | None,
                  secure_mode: bool) -> None:
        """out += N(0, std^2) per coordinate.

        In secure mode, Opacus's defence against floating-point attacks (Holohan et al., arXiv
        2107.10138, n=2): the sum of 4 draws divided by 2, after discarding one draw.
        """
        if std == 0:
            return
        if not secure_mode:
            out.add_(torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype), alpha=std)
            return
        torch.randn((1,), generator=generator, device=out.device)
        acc = torch.zeros_like(out)
        for _ in range(4):
            acc.add_(torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype))
        out.add_(acc, alpha=std / 2)


def noise_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A step's Philox seed: 62 random bits drawn from the noise generator (or torch's global RNG for
    the device when None, so ``torch.manual_seed`` fixes it, as it fixes the torch path's noise), with
    bit 62 set so that every seed is a 64-bit kernel argument (one compiled kernel for all steps)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item()) | (1 << 62)
