"""Clip / sum / noise passes over the per-example gradient buffer, behind one interface.

The buffer holds one contiguous (B, numel) block per parameter (see ``FlatLayout``); the collector
calls ``norms`` on each block as it is written and ``weighted_sum`` on each block at the end.

``backend="torch"`` is the reference and the CPU path. Fused kernels (Triton, CUDA) implement
the same three methods and are chosen by ``get_backend``; ``"auto"`` picks the fastest
available one for the buffer's device, which today is always ``"torch"``.
"""
from __future__ import annotations

import torch


class TorchBackend:
    name = "torch"

    def norms(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) L2 norms of the rows of a (B, n) block, in fp32 (into ``out`` if given)."""
        return torch.linalg.vector_norm(buffer, dim=1, dtype=torch.float32, out=out)

    def weighted_sum(self, buffer: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """out (n,) += weights @ buffer (the clip-weighted sum over the examples of a (B, n) block), in fp32."""
        if buffer.shape[0]:
            out.addmv_(buffer.t(), weights.to(buffer.dtype))

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


BACKENDS = {"torch": TorchBackend}


def get_backend(name: str = "auto", device: torch.device | str = "cpu"):
    """The clip/noise backend by name; ``"auto"`` = the best one available on ``device``."""
    if name == "auto":
        return TorchBackend()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {['auto', *sorted(BACKENDS)]}")
    return BACKENDS[name]()
