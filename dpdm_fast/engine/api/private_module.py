"""The wrapped model: per-group gradients captured by hooks, clipped at the end of each backward.

How the ordinary weight gradient is avoided: while a layer with trainable parameters runs its
``forward``, those parameters are marked ``requires_grad=False`` (a pre-hook freezes them, the
forward hook restores them), so autograd records no weight-gradient work. The layer's output is
passed through ``Tap``, an identity whose backward hands the output gradient and the layer's
inputs (saved with ``save_for_backward``, so autograd's in-place checks and
``torch.utils.checkpoint`` apply to them) to the layer's rule. The rule writes per-group
gradients into one flat buffer, a (B, numel) block per parameter (``GroupGradientCollector``), which
is clipped per example when the backward pass ends. The hooks live in ``dpdm_fast.engine.capture``
(``ModelGuard`` on the model, a ``LayerSite`` per layer), the buffer and the clipping in
``dpdm_fast.engine.clipping``; this module wires them together.

What keeps the guarantee honest (each is a test in ``tests/test_engine_hardening.py``):
- a parameter used outside its own layer's forward would get an ordinary, unclipped gradient:
  a post-accumulate-grad hook on every trainable parameter refuses it;
- the set of trainable parameters is checked at every forward (newly trainable -> refused,
  newly frozen -> stays frozen and gets no update);
- only a full ``backward()`` folds per-example gradients in; ``torch.autograd.grad`` passes the
  engine by (input gradients only), double backward and a second backward over one graph are refused.
"""
from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn as nn

from ..capture import ForwardState, LayerSite, ModelGuard, validate_module
from ..clipping import FlatLayout, GroupGradientCollector


class PrivateModule(nn.Module):
    """Wraps a model so that each backward pass yields clipped per-example gradients.

    ``state_dict()`` / ``load_state_dict()`` are the wrapped model's own (no prefix), so
    checkpoints stay interchangeable with the plain model. ``noise_multiplicity``,
    ``max_grad_norm`` and ``loss_reduction`` live in ``collector`` (one source of truth for the
    clipping and, through the DP optimizer, the noise).
    """

    def __init__(self, module: nn.Module, *, noise_multiplicity: int = 1, max_grad_norm: float = 1.0,
                 loss_reduction: str = "mean", backend: str = "auto", strict: bool = False,
                 allow_direct_calls: bool = False, batch_first: bool = True, grad_sample_views: bool = True):
        super().__init__()
        if isinstance(module, PrivateModule):
            raise ValueError("the module is already a PrivateModule: pass its plain model (private.remove_hooks())")
        validate_module(module)
        self._module = module
        self._register_load_state_dict_pre_hook(self._accept_plain_keys, with_module=True)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.collector = GroupGradientCollector(FlatLayout(self.trainable), noise_multiplicity,
                                                max_grad_norm, loss_reduction, backend, grad_sample_views)
        device = self.trainable[0].device if self.trainable else None
        self._state = ForwardState(self.collector, device, batch_first)
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._closed = False
        self._handles = []
        self._sites: list = []
        layout_ids = set(self.collector.layout.slots)
        for name, sub in module.named_modules():
            # A parameter that a submodule also owns is an alias there (Opacus's DPLSTM re-registers its
            # cells' weights under nn.LSTM's names): the submodule's hooks see its uses. A direct use by the
            # outer module would give it an ordinary gradient, which the post-accumulate hook refuses.
            inner = {id(p) for child in sub.children() for p in child.parameters()}
            own = {n: p for n, p in sub.named_parameters(recurse=False) if id(p) in layout_ids and id(p) not in inner}
            if not own:
                continue
            site = LayerSite(self._state, name, sub, own, strict)
            self._sites.append(site)
            self._handles.append(sub.register_forward_pre_hook(site.pre_hook, with_kwargs=True))
            self._handles.append(sub.register_forward_hook(site.forward_hook, with_kwargs=True, prepend=True,
                                                           always_call=True))
        guard = ModelGuard(module, self._state, self.trainable, self._names, allow_direct_calls)
        self._handles.append(module.register_forward_pre_hook(guard.enter, prepend=True, with_kwargs=True))
        self._handles.append(module.register_forward_hook(guard.exit, always_call=True))
        # The hook holds the module weakly: a tensor's hooks are invisible to Python's cycle collector,
        # so a strong reference (parameter -> hook -> this module -> model -> parameter) would keep the
        # module and its per-example buffer alive after the user dropped both (measured: 316 MiB kept
        # per discarded engine at B=256 on the small net).
        owner = weakref.ref(self)
        for p in self.trainable:
            self._handles.append(p.register_post_accumulate_grad_hook(partial(_refuse_ordinary_gradient, owner)))

    @property
    def backend(self) -> str:
        """The name of the backend computing per-group gradients and the clip/noise pass."""
        return self.collector.backend.name

    def computed_by(self) -> dict:
        """{layer name: which code computes its per-group gradients} (a backend's kernel, the
        torch rule, or the torch.func fallback)."""
        return {site.name: site.computed_by for site in self._sites}

    @property
    def noise_multiplicity(self) -> int:
        return self.collector.K

    @property
    def max_grad_norm(self) -> float:
        return self.collector.max_grad_norm

    @property
    def loss_reduction(self) -> str:
        return self.collector.loss_reduction

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._closed:
            raise RuntimeError("this private module was detached (remove_hooks, or a later make_private on its "
                               "model): use the module that make_private returned last")
        self._state.via_wrapper += 1
        try:
            return self._module(*args, **kwargs)
        finally:
            self._state.via_wrapper -= 1

    def _ordinary_gradient(self, p: torch.Tensor) -> None:  # (via _refuse_ordinary_gradient)
        p.grad = None  # never leave an unclipped gradient behind
        raise RuntimeError(f"parameter {self._names.get(id(p), '?')!r} received an ordinary (unclipped) gradient: "
                           "it is used outside the forward of the module that owns it (e.g. F.linear(x, "
                           "self.lin.weight) in a parent module, or in a forward hook), where per-example "
                           "gradients are not computed; use it through its own module")

    # -- plumbing --------------------------------------------------------------------------
    def close(self) -> None:
        """Detach the engine: hooks removed, this module and its optimizer refuse further use."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._closed = True
        self.collector.closed = True
        if self.collector.views is not None:
            self.collector.views.clear()   # (the views would keep the per-example buffer alive)

    def remove_hooks(self) -> nn.Module:
        """Detach the engine and return the plain model."""
        self.close()
        return self._module

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state dict, without a wrapper prefix (also when nested in another module)."""
        return self._module.state_dict(*args, **kwargs)

    @staticmethod
    def _accept_plain_keys(module, state_dict, prefix, *args) -> None:
        """Load-time twin of ``state_dict``: plain keys are routed to the wrapped model."""
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "_module.")]:
            state_dict[prefix + "_module." + key[len(prefix):]] = state_dict.pop(key)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item == "_module":
                raise
            return getattr(self._module, item)


def _refuse_ordinary_gradient(owner: "weakref.ref[PrivateModule]", p: torch.Tensor) -> None:
    module = owner()
    if module is not None:
        module._ordinary_gradient(p)
