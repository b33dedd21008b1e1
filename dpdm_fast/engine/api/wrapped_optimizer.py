"""Opacus's optimizer surface: a ``torch.optim.Optimizer`` whose groups and state are a wrapped optimizer's."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.optim import Optimizer

_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")


class WrappedOptimizer(Optimizer):
    """Delegates ``param_groups``, ``state``, ``defaults`` and their checkpoints to ``original_optimizer``
    (so learning-rate schedulers work as with Opacus's); ``step()`` runs the step hooks around
    ``pre_step()`` (the subclass's work; False: no update this time) and the wrapped optimizer's step."""

    # torch.amp.GradScaler then hands its scale to step() (as ``grad_scale``) instead of unscaling p.grad, which
    # the engine has not filled yet (the subclass unscales each example's gradient itself, or refuses).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: Optimizer):
        # No Optimizer.__init__: the wrapped optimizer owns the parameter groups and state.
        for hooks in _HOOK_DICTS:
            setattr(self, hooks, OrderedDict())
        self.original_optimizer = optimizer

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults) -> None:
        self.original_optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def pre_step(self) -> bool:
        raise NotImplementedError

    def check_loss_scale(self, grad_scale) -> None:
        """Called by step() when a GradScaler steps this optimizer with its scale: raise unless the
        gradients were unscaled by exactly that scale."""
        raise NotImplementedError

    def step(self, closure=None):
        if getattr(self, "grad_scale", None) is not None:
            self.check_loss_scale(self.grad_scale)
        if closure is not None:
            with torch.enable_grad():
                closure()
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        out = self.original_optimizer.step() if self.pre_step() else None
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return out
