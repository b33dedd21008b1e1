"""The DP-SGD engine: per-group gradients, flat clipping, noise, accounting.

How a step flows, and where each part lives (bottom to top; a layer imports only the ones below):

    profiling, mechanism     named profiler ranges; the public numbers (q, steps, divisor)
    clipping/                flat layout, per-example buffer, collector, backends (torch, fused, Triton, CUDA)
    capture/                 model and layer hooks, per-layer torch rules and kernel rules, autotune, validation
    distributed/             ranks, the per-step exchange, the dataset hash
    sampling/                Poisson sampler and loader (with its ledger), BatchMemoryManager
    api/                     PrivacyEngine, PrivateModule, DPOptimizer

``PrivacyEngine`` and the Poisson loader need Opacus (accountants, sampler) and are imported on
first use.
"""
from .api import AdaClipDPOptimizer, DPLoss, DPOptimizer, PrivateModule
from .capture import RULES, UnsupportedModuleError, autotune, find_rule, register_rule
from .clipping import GroupGradientCollector, get_backend, register_backend
from .distributed import ReplicaError
from .sampling.batch_memory_manager import BatchMemoryManager

__all__ = ["PrivacyEngine", "PrivateModule", "DPOptimizer", "AdaClipDPOptimizer", "DPLoss", "BatchMemoryManager", "PoissonDataLoader",
           "GroupGradientCollector", "UnsupportedModuleError", "ReplicaError", "register_rule", "find_rule", "RULES",
           "get_backend", "register_backend", "autotune"]


def __getattr__(name: str):
    if name == "PrivacyEngine":
        from .api.privacy_engine import PrivacyEngine
        return PrivacyEngine
    if name == "PoissonDataLoader":
        from .sampling.poisson import PoissonDataLoader
        return PoissonDataLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
