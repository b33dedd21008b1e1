"""Slow, obviously correct references for the DPDM update (noise 0), used by tests and benchmarks.

``loss_of_rows(model, *rows)`` must return one loss per row (N,), rows group-major with K rows
per example. Both functions return the flat (P,) update sum_i clip(g_i) / expected_batch_size,
g_i the average over example i's K rows of the per-row gradients.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn


def _clip_sum(per_example: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    # in float64: an fp32 norm over a whole 1.75M-parameter row is off by up to ~1e-4 (measured),
    # more than the engine's block-by-block fp32 norms, so an fp32 reference would be the less exact one
    per_example = per_example.double()
    norms = per_example.norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return (factors @ per_example).float()


def per_example_loop_update(model: nn.Module, loss_of_rows: Callable, rows: Sequence[torch.Tensor], K: int,
                            max_grad_norm: float, expected_batch_size: int) -> torch.Tensor:
    """One autograd backward per example on the mean of its K row losses (a ``None`` in ``rows``, e.g. an
    unconditional model's labels, is passed through as ``None``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    B = rows[0].shape[0] // K
    grads = []
    for b in range(B):
        chunk = [None if r is None else r[b * K:(b + 1) * K] for r in rows]
        g = torch.autograd.grad(loss_of_rows(model, *chunk).mean(), params, allow_unused=True)
        grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                for gi, p in zip(g, params)]))
    if not grads:
        return torch.zeros(sum(p.numel() for p in params))
    return _clip_sum(torch.stack(grads), max_grad_norm) / expected_batch_size


def opacus_k_averaged_update(model: nn.Module, loss_of_rows: Callable, rows: Sequence[torch.Tensor], K: int,
                             max_grad_norm: float, expected_batch_size: int) -> torch.Tensor:
    """What DPDM ran: Opacus 'hooks' per-row gradients (B*K of them), averaged per example, then clipped."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="mean")
    try:
        loss_of_rows(gsm, *rows).mean().backward()
        params = [p for p in model.parameters() if p.requires_grad]
        N = rows[0].shape[0]
        per_example = torch.cat([p.grad_sample.reshape(N // K, K, -1).mean(dim=1) for p in params], dim=1)
        for p in params:
            p.grad_sample = None
            p.grad = None
    finally:
        gsm._close()
    return _clip_sum(per_example, max_grad_norm) / expected_batch_size
