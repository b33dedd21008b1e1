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
    # the engine has not filled yet: step() can then refuse loss scaling with a reason, not an AssertionError.
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

    def step(self, closure=None):
        if getattr(self, "grad_scale", None) is not None:
            del self.grad_scale, self.found_inf     # (GradScaler deletes them only after a step that returns)
            raise RuntimeError(
                "fp16 loss scaling (torch.amp.GradScaler) is not supported by the DP engine yet: the per-example "
                "gradients would carry the loss scale, so clipping them at max_grad_norm would clip the true "
                "gradients at max_grad_norm / scale, and a skipped step would depend on the private data. Train "
                "in fp32 or with bf16 autocast (--amp), which needs no loss scaling")
        if closure is not None:
            with torch.enable_grad():
                closure()
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        out = self.original_optimizer.step() if self.pre_step() else None
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return out
