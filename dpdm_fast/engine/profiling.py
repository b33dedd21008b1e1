"""Named ranges in torch profiler traces (``bench/fixed_costs.py`` reads them).

Near the bottom of the engine: it imports only torch and ``cpu_allocator``, so every layer above may use it.
"""
from __future__ import annotations

import contextlib
import os

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


def resident_growth_measurable() -> bool:
    """Whether ``peak_resident_growth`` can measure here (Linux lets a process reset its high-water mark)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def peak_resident_growth(fn) -> int | None:
    """Run ``fn()``; how far the process's resident memory peaked above where it started meanwhile (Linux:
    the kernel's high-water mark, reset first), or None where the kernel does not offer it (``fn`` runs
    all the same).

    Where freed memory stays in the process (``cpu_allocator.keep_freed_memory``) this, not the tensors'
    peak, is what a pass costs the machine: the heap keeps its fragmentation too. The free pages the heap
    keeps are given back first, so that the growth starts from what is live."""
    from .cpu_allocator import release_free_memory

    release_free_memory()
    start = reset_resident_peak()
    fn()
    return None if start is None else resident_bytes("VmHWM") - start


def reset_resident_peak() -> int | None:
    """Reset the kernel's high-water mark of this process's resident memory (VmHWM) to what is resident
    now, and return that in bytes; None where the kernel does not permit it (not Linux, a sandbox)."""
    try:
        start = resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return start


def resident_bytes(field: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")
