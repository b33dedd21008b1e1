"""One layer with trainable parameters: its rule, and the forward hooks that feed it.

``LayerSite.pre_hook`` freezes the layer's parameters while the layer runs (so autograd does no
weight-gradient work); ``forward_hook`` passes the output through ``Tap``, an identity whose backward
hands the output gradient and the layer's inputs (saved with ``save_for_backward``, so autograd's
in-place checks and ``torch.utils.checkpoint`` apply to them) to the layer's rule
(``rule_runner.compute``), which writes per-group gradients into the collector's flat buffer.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .call_checks import check_call, check_still_the_rules_layer
from .forward_state import ForwardState, in_backward
from .kernel_rules import kernel_rules_for
from .rules import find_rule
from .taps import TENSOR, Call, Tap


class LayerSite:
    """A layer with trainable parameters: its rule and the hooks that feed it."""

    def __init__(self, state: ForwardState, name: str, module: nn.Module, params: dict, strict: bool):
        self.state, self.name, self.module, self.params = state, name or "<root>", module, params
        spec = find_rule(module)
        if spec is not None and spec.check is not None:
            spec.check(module)
        if spec is None:
            message = (f"module {self.name!r} ({type(module).__name__}) with trainable parameters "
                       f"{list(params)} has no per-group rule")
            if strict:
                raise NotImplementedError(message + "; register one with dpdm_fast.engine.register_rule "
                                          "or pass strict=False to use the slower torch.func fallback")
            warnings.warn(message + "; using the torch.func (vmap) fallback, which is slower")
        self.spec = spec
        # The dimension of its inputs and output that holds the rows: the model's (make_private's batch_first),
        # except for Opacus's RNNLinear, which DPLSTM/DPGRU/DPRNN call once per time step on (rows, features).
        self.batch_dim = 0 if _per_time_step(module) else state.batch_dim
        if spec is None and self.batch_dim:
            raise NotImplementedError(f"module {self.name!r} ({type(module).__name__}) has no per-group rule, and the "
                                      "torch.func fallback splits examples on dim 0 while the model is sequence-first "
                                      "(batch_first=False): register a rule for it, or make the model batch-first")
        self.layout_seen = False   # (batch_first=False) a call where only dim 1 had the rows confirmed the layout
        # the backend's fused kernel for this layer, where it has one (the torch rule stays the reference)
        backend = state.collector.backend
        self.kernel = kernel_rules_for(backend).get(spec.cls) if spec is not None else None

    @property
    def computed_by(self) -> str:
        """Which code computes this layer's per-group gradients."""
        if self.spec is None:
            return "torch.func fallback"
        return f"{self.state.collector.backend.name} kernel" if self.kernel is not None else "torch rule"

    def full_name(self, pname: str) -> str:
        return pname if self.name == "<root>" else f"{self.name}.{pname}"

    def pre_hook(self, module, args, kwargs):
        state = self.state
        if state.in_rule or not torch.is_grad_enabled():
            return None
        in_bwd = in_backward()
        if in_bwd and id(module) not in state.calls:
            raise RuntimeError(f"{self.name!r} ran inside a backward pass without having run with gradients in the "
                               "forward: torch.utils.checkpoint(use_reentrant=True) clips each checkpointed "
                               "segment separately, which weakens the guarantee; use use_reentrant=False "
                               "(supported and tested)")
        if self.spec is not None:
            check_still_the_rules_layer(self, module)
        if not in_bwd:
            if state.depth == 0:
                raise RuntimeError(f"{self.name!r} of a model wrapped by make_private was called directly with "
                                   "gradients enabled: call the private module that make_private returned (or "
                                   "private.remove_hooks() to get the plain model back); under torch.no_grad() "
                                   "the wrapped model can be used as is, e.g. for sampling")
            state.calls.add(id(module))   # (a layer may run several times: its uses' gradients add up)
        running = {id(p) for frozen in state.frozen.values() for p in frozen}   # (layers mid-forward)
        nested = [self.full_name(n) for n, p in self.params.items() if id(p) in running]
        if nested:
            raise NotImplementedError(f"{self.name!r} ran inside the forward of a layer that uses the same "
                                      f"parameters {nested[:3]} (a module calling itself, or a tied weight used "
                                      "by a submodule of its owner): the outer layer's rule would count the inner "
                                      "use again; call the layers one after the other instead")
        frozen = [p for p in self.params.values() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        state.frozen[id(module)] = frozen
        return None

    def forward_hook(self, module, args, kwargs, output):
        frozen = self.state.frozen.pop(id(module), None)
        if frozen is None:
            return None
        for p in frozen:
            p.requires_grad_(True)
        if output is None or not frozen:   # forward raised, or every parameter is frozen by the user
            return None
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(f"module {self.name!r} returns {type(output).__name__}; per-group "
                                      "gradients need layers with trainable parameters to return one tensor")
        check_call(self, args, kwargs, output)
        ids = {id(p) for p in frozen}
        names = [n for n, p in self.params.items() if id(p) in ids]
        saved = [a.detach() for a in args if isinstance(a, torch.Tensor)]
        saved += [v.detach() for v in kwargs.values() if isinstance(v, torch.Tensor)]
        if self.spec is not None and self.spec.save is not None:
            saved += [t.detach() for t in self.spec.save(module, args, output) or ()]
        call = Call(self, names, [TENSOR if isinstance(a, torch.Tensor) else a for a in args],
                    {k: TENSOR if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return Tap.apply(output, self.state.trigger, call, *saved)


def _per_time_step(module: nn.Module) -> bool:
    try:
        from opacus.layers.dp_rnn import RNNLinear
    except ImportError:   # pragma: no cover (opacus is a dependency)
        return False
    return isinstance(module, RNNLinear)
