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
