"""Opacus's module-compatibility methods of ``PrivacyEngine``: which models make_private accepts."""
from __future__ import annotations

import torch.nn as nn
from opacus.validators import ModuleValidator
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ..capture import compatibility_errors, validate_module


class ModuleCompatibility:
    """``is_compatible`` / ``validate`` / ``get_compatible_module``, as Opacus names them."""

    def is_compatible(self, *, module: nn.Module, optimizer: Optimizer | None = None,
                      data_loader: DataLoader | None = None) -> bool:
        """True when ``make_private`` would accept the module (see ``validate`` for the reasons)."""
        return not compatibility_errors(module)

    def validate(self, *, module: nn.Module, optimizer: Optimizer | None = None,
                 data_loader: DataLoader | None = None) -> None:
        """Raise ``UnsupportedModuleError`` listing every reason the module is not supported."""
        validate_module(module)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """Opacus's fixes (BatchNorm -> GroupNorm, ...), then validation."""
        module = ModuleValidator.fix(module)
        validate_module(module)
        return module
