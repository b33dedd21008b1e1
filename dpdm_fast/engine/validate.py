"""Checks that refuse models whose per-example gradients would be wrong or undefined."""
from __future__ import annotations

import torch.nn as nn


def validate_module(module: nn.Module) -> None:
    """Raise ValueError for cross-example layers and tied (shared) trainable parameters."""
    try:
        from opacus.validators import ModuleValidator
    except ImportError:  # without Opacus: refuse the cross-example layers we know of
        errors = [f"{name}: {type(m).__name__}" for name, m in module.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)]
    else:
        errors = ModuleValidator.validate(module, strict=False)
    if errors:
        lines = "\n  ".join(str(e) for e in errors)
        raise ValueError("the model mixes information across examples, so per-example gradients are not "
                         f"defined (fix: replace BatchNorm by GroupNorm, e.g. opacus.validators."
                         f"ModuleValidator.fix(model)):\n  {lines}")
    owners: dict[int, str] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        for pname, p in sub.named_parameters(recurse=False, remove_duplicate=False):
            if not p.requires_grad:
                continue
            full = f"{name}.{pname}" if name else pname
            if id(p) in owners and owners[id(p)] != full:
                raise ValueError(f"parameter {full!r} is the same tensor as {owners[id(p)]!r} (tied weights): "
                                 "a parameter used twice in one forward is not supported; untie them")
            owners[id(p)] = full
