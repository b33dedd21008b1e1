"""Checks that refuse models whose per-example gradients would be wrong or undefined."""
from __future__ import annotations

import torch.nn as nn
from torch.nn.utils import parametrize

try:
    from opacus.validators.errors import UnsupportedModuleError
except ImportError:  # the gradient machinery also works without Opacus
    class UnsupportedModuleError(ValueError):
        pass


def _weight_hooks(module: nn.Module) -> list[str]:
    """Old-style weight_norm / spectral_norm: forward pre-hooks that rebuild the weight from parameters."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return [type(h).__name__ for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]


def compatibility_errors(module: nn.Module) -> list[str]:
    """Every reason the model cannot be trained with per-example clipping (empty: it can)."""
    # Cross-example layers, whether or not their parameters train (Opacus's validator only looks at
    # trainable modules of exact types: a frozen or affine-free BatchNorm still mixes examples in
    # its output and leaks them through its running statistics).
    errors = [f"{name or '<root>'}: {type(m).__name__} mixes examples (batch statistics / running stats)"
              for name, m in module.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)
              or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)]
    try:
        from opacus.validators import ModuleValidator
    except ImportError:
        pass
    else:
        errors += [str(e) for e in ModuleValidator.validate(module, strict=False)
                   if not (errors and str(e).startswith("BatchNorm cannot"))]  # said above, with names
    for name, sub in module.named_modules():
        if parametrize.is_parametrized(sub) or _weight_hooks(sub):
            errors.append(f"{name or '<root>'}: {type(sub).__name__} has a parametrization / weight_norm / "
                          "spectral_norm, whose weight is computed from other parameters outside the layer's "
                          "forward; remove it (torch.nn.utils.parametrize.remove_parametrizations(..., "
                          "leave_parametrized=True)) or write the reparametrisation inside a module's forward")
    return errors


def validate_module(module: nn.Module) -> None:
    """Raise ``UnsupportedModuleError`` (Opacus's type, a ValueError) listing every incompatibility."""
    errors = compatibility_errors(module)
    if errors:
        lines = "\n  ".join(errors)
        fix = ("\n(cross-example layers: replace them by GroupNorm, e.g. PrivacyEngine.get_compatible_module(model))"
               if any("mixes examples" in e or "BatchNorm" in e for e in errors) else "")
        raise UnsupportedModuleError(f"the model cannot be trained with per-example clipping:\n  {lines}{fix}")
