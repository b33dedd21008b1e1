"""Which code computes the per-group gradients and the clip / sum / noise pass: one interface.

The per-example buffer holds one contiguous (B, numel) block per parameter (see ``FlatLayout``).
A backend supplies

- ``norms(block, out)``: per-example norms of a block written by a torch rule;
- ``kernel_rules``: {layer class: kernel rule} for the layers it computes itself (a kernel rule
  writes the layer's per-group gradients straight into the buffer and adds their squared norms
  to the norm table; layers without one use the torch rules, the reference);
- ``reduce(job, total, noise, out)``: fold a backward's buffer (``ClipJob``) into the clipped sum,
  and, in the final pass of a step (``noise`` given), add the noise, divide by the expected batch
  size and write the parameters' flat gradient into ``out``, in one pass.

``"torch"`` is the reference and the CPU path; ``"triton"`` the fused Triton kernels
(``dpdm_fast.kernels``); ``"cuda"`` the CUDA C++ twins (``csrc/``). ``"auto"`` picks Triton for a
model on a GPU and torch on the CPU. A backend that cannot run here is an error saying why, never a
silent substitute.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

from .layout import FlatLayout


@dataclass
class ClipJob:
    """One backward pass's per-example gradients, waiting to be clipped and summed."""
    layout: FlatLayout
    storage: torch.Tensor       # the flat buffer: param after param, a (B, numel) block each
    B: int
    written: list               # per parameter of the layout: did this backward write its block
    norms: torch.Tensor         # (B,) fp32 per-example norms (scaled as the gradients are)
    max_grad_norm: float
    scale: float                # the per-example scale (loss reduction, average over K) of the gradients

    def factors(self) -> torch.Tensor:
        return (self.max_grad_norm / (self.norms + 1e-6)).clamp(max=1.0) * self.scale

    def blocks(self):
        """(param, its (B, numel) block) for each parameter this backward wrote."""
        for p, w in zip(self.layout.params, self.written):
            if w:
                yield p, self.layout.block(self.storage, p, self.B).view(self.B, p.numel())


@dataclass
class Noise:
    """The final pass of a step: out = (clipped sum + N(0, std^2)) / divisor."""
    std: float
    generator: torch.Generator | None
    secure_mode: bool
    divisor: float


class TorchBackend:
    """The reference: torch rules for every layer, then the clip-weighted sum block by block
    (one matrix-vector product each), noise from ``torch.randn``."""
    name = "torch"
    kernel_rules: dict = {}

    def norms(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) L2 norms of the rows of a (B, n) block, in fp32 (into ``out`` if given)."""
        return torch.linalg.vector_norm(buffer, dim=1, dtype=torch.float32, out=out)

    def reduce(self, job: ClipJob | None, total: torch.Tensor, noise: Noise | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        from .collector import profile_scope
        if job is not None and job.B:
            with profile_scope("dpdm_fast.clip_sum"):
                factors = job.factors()
                for p, blk in job.blocks():
                    job.layout.flat_view(total, p).view(-1).addmv_(blk.t(), factors.to(blk.dtype))
        if noise is None:
            return total
        with profile_scope("dpdm_fast.noise"):
            self.add_noise(total, noise.std, noise.generator, noise.secure_mode)
            if noise.divisor != 1:
                total.div_(noise.divisor)
        with profile_scope("dpdm_fast.grads_out"):
            return total.clone() if out is None else out.copy_(total)

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


BACKENDS = ("torch", "triton", "cuda")


def get_backend(name: str = "auto", device: torch.device | str = "cpu"):
    """The backend by name for a model on ``device``; ``"auto"`` = Triton on a GPU, torch on the CPU."""
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return TorchBackend()
        if importlib.util.find_spec("triton") is None:
            warnings.warn("backend='auto' on a GPU without Triton installed: using the torch backend "
                          "(pip install triton for the fused kernels)", stacklevel=3)
            return TorchBackend()
        name = "triton"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        return _triton_backend(device)
    if name == "cuda":
        from .cuda_backend import CudaBackend
        return CudaBackend(device)
    raise ValueError(f"unknown backend {name!r}; available: {['auto', *BACKENDS]}")


def _triton_backend(device: torch.device):
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend='triton' needs Triton, which is not installed: pip install triton "
                           "(or use backend='torch')")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cpu" and not interpret:
        raise RuntimeError("backend='triton' with the model on the CPU runs the kernels in Triton's interpreter, "
                           "which needs TRITON_INTERPRET=1 set before dpdm_fast is imported (slow: for tests); "
                           "on a CPU use backend='torch', or move the model to a GPU first")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' runs on CUDA GPUs (or the CPU interpreter), not on {device.type}")
    from .triton_backend import TritonBackend
    return TritonBackend(device)
