"""The DP-SGD engine: per-group gradients, flat clipping, noise, accounting."""
from .backends import get_backend
from .optimizer import DPOptimizer
from .privacy_engine import PrivacyEngine
from .private_module import GroupGradientCollector, PrivateModule
from .rules import RULES, find_rule, register_rule
from .sampling import BatchMemoryManager, PoissonDataLoader

__all__ = ["PrivacyEngine", "PrivateModule", "DPOptimizer", "BatchMemoryManager", "PoissonDataLoader",
           "GroupGradientCollector", "register_rule", "find_rule", "RULES", "get_backend"]
