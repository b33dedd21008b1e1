"""Named ranges in torch profiler traces (``bench/fixed_costs.py`` reads them).

The bottom of the engine: it imports only torch, so every layer above may use it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.profiler import record_function


def profile_scope(name: str):
    """A named range in torch profiler traces; free when not profiling."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def peak_allocated_bytes(fn, device: torch.device) -> int:
    """The peak bytes of tensors live while ``fn()`` runs, above those live when it starts. CUDA: the caching
    allocator's peak; CPU: summed from the torch profiler's allocation events (exact and repeatable,
    unlike the process's peak RSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on CUDA GPUs and the CPU, not on {device}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak
