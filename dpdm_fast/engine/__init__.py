"""The DP-SGD engine: per-group gradients, flat clipping, noise, accounting.

``PrivacyEngine`` and the Poisson loader need Opacus (accountants, sampler) and are imported on
first use, so the gradient machinery also works where Opacus is not installed.
"""
from .backends import get_backend
from .batch_memory_manager import BatchMemoryManager
from .optimizer import DPOptimizer
from .collector import GroupGradientCollector
from .distributed import ReplicaError
from .private_module import PrivateModule
from .rules import RULES, find_rule, register_rule
from .validate import UnsupportedModuleError

__all__ = ["PrivacyEngine", "PrivateModule", "DPOptimizer", "BatchMemoryManager", "PoissonDataLoader",
           "GroupGradientCollector", "UnsupportedModuleError", "ReplicaError", "register_rule", "find_rule", "RULES", "get_backend"]


def __getattr__(name: str):
    if name == "PrivacyEngine":
        from .privacy_engine import PrivacyEngine
        return PrivacyEngine
    if name == "PoissonDataLoader":
        from .poisson import PoissonDataLoader
        return PoissonDataLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
