"""Clipping: the flat per-example buffer, its norms, the clipped sum and the step's noise.

Owns: the flat layout of the trainable parameters (``layout``), the per-example buffer of one
backward pass (``buffer``), the collector that the rules write into and that keeps the running
clipped sum and every clipping setting (``collector``), and the backends that clip, sum, noise and
scale (``backends/``: the torch reference, the fused pass shared by Triton and CUDA, each found by
name in a registry).

May import: ``dpdm_fast.engine.profiling``, ``dpdm_fast.kernels`` and ``dpdm_fast.csrc`` (lazily, in the
fused backends). Never capture, sampling, distributed or the public API: the rules reach the
collector as an object.
"""
from .backends import BACKENDS, ClipJob, Noise, TorchBackend, get_backend, register_backend
from .buffer import PerExampleBuffer
from .collector import GroupGradientCollector
from .layout import FlatLayout

__all__ = ["GroupGradientCollector", "FlatLayout", "PerExampleBuffer", "ClipJob", "Noise", "TorchBackend",
           "get_backend", "register_backend", "BACKENDS"]
