"""The wrapped model's own forward hooks: what must hold at each training forward of the whole model.

- it is called through the private module (or ``wrap_model=False`` allows direct calls);
- its modules are those that were wrapped (a layer added later is neither validated nor hooked);
- its trainable parameters are those that were wrapped (newly trainable -> refused, newly frozen ->
  they stay frozen and get no update);
- no global forward hooks (they run before the engine's and could change a layer's output);
- no buffer is modified (a running statistic of the batch would be released without noise).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from .forward_state import ForwardState, in_backward


class ModelGuard:
    """Model-level ``enter`` (forward pre-hook) and ``exit`` (always-called forward hook)."""

    def __init__(self, module: nn.Module, state: ForwardState, trainable: list, names: dict, allow_direct: bool):
        self.module, self.state, self.trainable, self.names = module, state, trainable, names
        self.allow_direct = allow_direct
        self.structure = self._signature()
        self._buffer_versions: dict | None = None

    def enter(self, module, args, kwargs) -> None:
        state = self.state
        # `exit` runs even when this hook raises (always_call), so count first, then check.
        state.depth += 1
        if state.depth > 1 or in_backward() or not torch.is_grad_enabled():
            return None   # nested call, recomputation by torch.utils.checkpoint, or no gradients
        if not state.via_wrapper and not self.allow_direct:
            raise RuntimeError("this model was wrapped by make_private: call the private module it returned "
                               "(or private.remove_hooks() to get the plain model back); under "
                               "torch.no_grad() the model can be used as is, e.g. for sampling")
        state.calls.clear()
        self._check_structure()
        self._check_trainable()
        if _module_globals._global_forward_hooks:
            raise RuntimeError("global module forward hooks are registered (torch.nn.modules.module."
                               "register_module_forward_hook); they run before the engine's hooks and can change a "
                               "layer's output behind its rule's back: remove them while training privately")
        if any(isinstance(t, PackedSequence) for t in (*args, *kwargs.values())):
            raise NotImplementedError("PackedSequence inputs are not supported: each time step of a packed batch "
                                      "has its own number of rows, while the engine's per-example buffer has one; "
                                      "pass the padded batch (pad_packed_sequence) and mask the loss instead")
        dim = state.batch_dim
        state.rows = next((t.shape[dim] for t in tree_flatten((args, kwargs))[0]
                           if isinstance(t, torch.Tensor) and t.dim() > dim), None)
        if state.rows is None:
            raise ValueError(f"the private module must be called with the batch as a tensor argument (rows on dim "
                             f"{dim}, as make_private's batch_first says)")
        self._buffer_versions = {n: b._version for n, b in module.named_buffers()}
        return None

    def exit(self, module, args, output) -> None:
        self.state.depth -= 1
        if self.state.depth:
            return
        self._restore_frozen()
        versions, self._buffer_versions = self._buffer_versions, None
        if versions is not None and output is not None:
            changed = [n for n, b in module.named_buffers() if n in versions and b._version != versions[n]]
            if changed:
                raise RuntimeError(f"buffers {changed[:5]} were modified during a training forward: a buffer computed "
                                   "from the batch (like BatchNorm's running statistics) is released with the model "
                                   "without clipping or noise; update it outside the private forward, or make it a "
                                   "non-buffer attribute if it does not depend on the data")

    def _signature(self) -> tuple:
        return tuple((name, id(m), type(m)) for name, m in self.module.named_modules())

    def _check_structure(self) -> None:
        if self._signature() != self.structure:
            before = {n: t.__name__ for n, _, t in self.structure}
            now = {n: type(m).__name__ for n, m in self.module.named_modules()}
            diff = sorted(set(before.items()) ^ set(now.items()))
            raise RuntimeError(f"the model's modules changed after make_private ({diff[:4]}): layers added or replaced "
                               "after wrapping are neither validated nor hooked; wrap the model again with make_private")

    def _restore_frozen(self) -> None:
        """Undo freezes a failed forward left behind (each layer's always-called forward hook normally
        undoes its own; this runs once the outermost forward ends, even when it raised)."""
        for frozen in self.state.frozen.values():
            for p in frozen:
                p.requires_grad_(True)
        self.state.frozen.clear()

    def _check_trainable(self) -> None:
        collector = self.state.collector
        slots = collector.layout.slots
        for name, p in self.module.named_parameters():
            if p.requires_grad and id(p) not in slots:
                raise RuntimeError(f"parameter {name!r} requires grad but was not trainable when the model was "
                                   "wrapped, so its gradient would be neither clipped nor noised: freeze it again "
                                   "(requires_grad_(False)) or wrap the model again with make_private")
        active = frozenset(id(p) for p in self.trainable if p.requires_grad)
        collector.set_active(active, self.names)
