"""Capture: the hooks on the wrapped model and its layers, and the per-layer rules they feed.

Owns: the model's guard hooks (``model_guard``), one ``LayerSite`` per layer with trainable
parameters (``site``: freeze the parameters while the layer runs, tap its output), the autograd tap
whose backward runs the layer's rule (``taps``, ``rule_runner``), the torch rules (``rules/``, one
file per layer, registered), the fused kernel rules beside them (``kernel_rules``, keyed by backend
name), the autotuner of the rules' paths, and the model validation (``validate``).

May import: ``dpdm_fast.engine.profiling``, ``dpdm_fast.models`` (layer classes), ``dpdm_fast.kernels``
(lazily, for kernel rules). Never the wrapped module class that owns the sites (``api``), the
collector's module, sampling or distributed: the collector is handed in as an object
(``ForwardState.collector``).
"""
from . import autotune
from .forward_state import ForwardState, in_backward
from .model_guard import ModelGuard
from .rules import RULES, find_rule, functorch_rule, register_rule
from .site import LayerSite
from .validate import UnsupportedModuleError, compatibility_errors, validate_module

__all__ = ["ForwardState", "ModelGuard", "LayerSite", "RULES", "find_rule", "register_rule", "functorch_rule",
           "UnsupportedModuleError", "compatibility_errors", "validate_module", "in_backward", "autotune"]
