"""One-time autotuning of a rule's computation path, cached per shape (as Triton's autotuner does).

Which way of computing a per-group gradient is fastest depends on the batch, K, channels, map size
and device (on 2 CPU cores, for a 3x3 conv: one grouped call wins at K=1 on 28x28 maps, a loop
over examples at K=8 on 28x28, an unfold + batched GEMM on 7x7 maps). No single threshold gets
them all, so the first call with a new shape key runs every candidate path (a warm-up, then
TIMED_ROUNDS timed runs in turns for those not already far behind), keeps the fastest, and later
calls with that key run only it. Batch sizes are bucketed to powers of two,
so Poisson batches of varying size share a handful of keys.

Candidates may write into the same output block (the engine's buffer): every path computes the
same values, so whichever ran last left a correct result there.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Hashable, Iterator

import torch

TIMED_ROUNDS = 2
PRUNE_FACTOR = 4.0
_CHOICES: Dict[Hashable, str] = {}
_FORCED: Dict[str, str] = {}
_FIXED = [False]   # inside ``fixed()``: first candidate, no timing (reproducible across runs)


def batch_bucket(n: int) -> int:
    """The power of two at or above n (0 stays 0): nearby Poisson batch sizes share a key."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_fastest(rule: str, key: Hashable, candidates: Dict[str, Callable[[], torch.Tensor]],
                device: torch.device) -> torch.Tensor:
    """Result of the fastest candidate for ``key`` (timing all of them the first time ``key`` is seen)."""
    if rule in _FORCED:
        if _FORCED[rule] not in candidates:
            raise ValueError(f"path {_FORCED[rule]!r} is not available for this {rule} call (candidates: "
                             f"{sorted(candidates)})")
        return candidates[_FORCED[rule]]()
    if _FIXED[0]:
        return next(iter(candidates.values()))()
    name = _CHOICES.get((rule, key))
    if name is not None and name in candidates:
        return candidates[name]()
    # One warm-up call each (allocations, lazy initialisation); a path already PRUNE_FACTOR times
    # slower than the fastest warm-up is not timed further (at B=1024 the loop over examples can
    # take seconds). The rest get TIMED_ROUNDS timed calls, taken in turns so that a burst of
    # machine noise does not pick the path; the minimum counts.
    results, warm = {}, {}
    for name, fn in candidates.items():
        start = _now(device)
        results[name] = fn()
        warm[name] = _now(device) - start
    fastest_warm = min(warm.values())
    timed = [n for n in candidates if warm[n] <= PRUNE_FACTOR * fastest_warm]
    best: Dict[str, float] = {}
    for _ in range(TIMED_ROUNDS):
        for name in timed:
            start = _now(device)
            results[name] = candidates[name]()
            best[name] = min(best.get(name, float("inf")), _now(device) - start)
    choice = min(best, key=best.get)
    _CHOICES[(rule, key)] = choice
    return results[choice]


def chosen_paths() -> Dict[Hashable, str]:
    """The cached choices so far, {(rule, key): path} (for benchmarks and reports)."""
    return dict(_CHOICES)


@contextlib.contextmanager
def force_path(rule: str, path: str) -> Iterator[None]:
    """Use ``path`` for ``rule`` regardless of timings (tests compare every path with the reference)."""
    previous = _FORCED.get(rule)
    _FORCED[rule] = path
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(rule, None)
        else:
            _FORCED[rule] = previous


@contextlib.contextmanager
def fixed() -> Iterator[None]:
    """Every rule takes its first (reference) path without timing: results then do not depend on which path
    happened to be fastest on this machine, so two runs with the same seeds agree bitwise (as
    ``torch.backends.cudnn.benchmark = False``). Slower where another path would have won."""
    previous, _FIXED[0] = _FIXED[0], True
    try:
        yield
    finally:
        _FIXED[0] = previous


def clear_cache() -> None:
    _CHOICES.clear()


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """An empty cache inside (every shape key is tuned anew, as on a fresh process's first calls), and the
    caller's choices back afterwards (a memory probe must neither reuse nor leave choices)."""
    saved = dict(_CHOICES)
    _CHOICES.clear()
    try:
        yield
    finally:
        _CHOICES.clear()
        _CHOICES.update(saved)


def _portable(value):
    """A cache key with dtypes as strings, so a checkpoint holding it loads with ``weights_only=True``."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, tuple):
        return tuple(_portable(v) for v in value)
    return value


def _restored(value):
    if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
        return getattr(torch, value[6:])
    if isinstance(value, tuple):
        return tuple(_restored(v) for v in value)
    return value


def state_dict() -> list:
    """The cached choices as [(rule, key, path)] (for a training checkpoint: a resumed run then takes the
    same paths, so it continues bitwise as the uninterrupted run would have)."""
    return [(rule, _portable(key), path) for (rule, key), path in _CHOICES.items()]


def load_state_dict(state: list) -> None:
    """Adopt saved choices (they override what this process measured for the same keys)."""
    for rule, key, path in state:
        _CHOICES[(rule, _restored(tuple(key) if isinstance(key, list) else key))] = path
