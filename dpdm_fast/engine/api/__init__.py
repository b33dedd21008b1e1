"""The public API: ``PrivacyEngine`` (Opacus's drop-in), the wrapped module and the DP optimizer.

Owns: ``PrivacyEngine`` (``privacy_engine``, with its accounting, module-compatibility and
Opacus-checkpoint parts in ``accounting``, ``compatibility``, ``opacus_checkpoint``, and
``make_private``'s pieces in ``wrapping``), ``PrivateModule`` (wires the capture hooks to a
collector), ``DPOptimizer`` (Opacus's optimizer surface in ``wrapped_optimizer``, the per-step checks
in ``step_checks``) and its adaptive-clipping subclass ``AdaClipDPOptimizer``, ``DPLoss`` (ghost mode's
loss wrapper).

May import every layer below it: capture, clipping, distributed, sampling, mechanism, profiling.
Nothing in the engine imports it.
"""
from .adaptive_clipping import AdaClipDPOptimizer
from .dp_loss import DPLoss
from .optimizer import DPOptimizer
from .private_module import PrivateModule

__all__ = ["PrivacyEngine", "PrivateModule", "DPOptimizer", "AdaClipDPOptimizer", "DPLoss"]


def __getattr__(name: str):
    if name == "PrivacyEngine":   # imported on first use (it needs Opacus's accountants)
        from .privacy_engine import PrivacyEngine
        return PrivacyEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
