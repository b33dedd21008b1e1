"""Keep freed CPU memory for reuse: glibc's allocator, tuned for DP passes of large, equal tensors.

A pass of the published networks on the CPU allocates tensors of hundreds of MiB (K rows per example,
activations, the per-example buffer) and frees them at its end, every pass. glibc serves every block
above 32 MiB with its own ``mmap`` and returns it with ``munmap`` on free, so the next pass faults every
page in again and the kernel zeroes it: on the published MNIST network (2-core VM, torch 2.13) that was
more than half of a full-size step's CPU time (4,015 s of 8,304 s "system" time, 1.1e9 page faults).
With mmap off and the heap's top never trimmed, freed blocks stay in the process and the next pass
reuses them (``bench/cpu_allocator.py``; numbers in bench/RESULTS.md).

The price: the process keeps its peak (and the heap's fragmentation) resident for its lifetime, so the
memory plan measures resident memory (``profiling.peak_resident_growth``) while this is on; a numeric
``dp.max_physical_batch_size`` is not measured, and its resident cost is then above the tensors' peak
(1.46x at the published MNIST network's pass of 48 examples on a 2-core VM). Blocks that torch's worker
threads allocate above 64 MiB still come and go with mmap (glibc's thread arenas): no gain, no harm.
Off with ``DPDM_FAST_CPU_ALLOCATOR=system``; it only exists where glibc does (Linux).
"""
from __future__ import annotations

import ctypes
import functools
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
ENV = "DPDM_FAST_CPU_ALLOCATOR"

_state = {"keeping": False}


@functools.cache
def _glibc():
    """glibc's handle, or None on other C libraries (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()          # glibc's own symbol: musl and others lack it
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> str:
    """Make freed blocks stay in the process for reuse (mmap off, no trimming); what was done, in words.

    Process-wide and lasting: call it once at the start of a CPU command, before its large tensors."""
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"{ENV}={choice!r}: use 'keep' (the default: freed memory is reused) or 'system' "
                         "(glibc's own policy)")
    if choice == "system":
        return f"CPU allocator: glibc's own policy ({ENV}=system)"
    if _state["keeping"]:
        return "CPU allocator: freed memory is kept for reuse"
    libc = _glibc()
    if libc is None:
        return "CPU allocator: the C library's own policy (not glibc: nothing to tune)"
    # (mallopt takes an int; glibc reads the threshold as a size_t, so -1 is "never trim")
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        raise RuntimeError("glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD): set "
                           f"{ENV}=system to run with its own policy")
    _state["keeping"] = True
    return (f"CPU allocator: freed memory is kept for reuse (glibc mmap off, no trimming; {ENV}=system "
            "turns this off)")


def is_keeping_freed_memory() -> bool:
    """Whether ``keep_freed_memory`` is in force in this process."""
    return _state["keeping"]


def release_free_memory() -> None:
    """Give the free pages the heap keeps back to the system (after a probe tried larger passes than the
    run will use, or before measuring resident growth from a clean start)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def available_bytes() -> int | None:
    """The system's MemAvailable after the heap's free pages are given back (they are this process's to
    use), or None where /proc/meminfo cannot be read (not Linux)."""
    release_free_memory()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
