"""The wrapped model: per-group gradients captured by hooks, clipped at the end of each backward.

How the ordinary weight gradient is avoided: during ``forward`` the trainable parameters are
temporarily marked ``requires_grad=False``, so autograd records no weight-gradient work; each
parametrised layer's output is passed through ``_Tap``, an identity whose backward hands the
output gradient to the layer's rule (and which depends on a dummy ``trigger`` tensor so that
backward reaches even the first layer). The rule writes the per-group gradients into one flat
(B, P) buffer; when the backward pass ends, the buffer is clipped per example and folded into
a running clipped sum, which the DP optimizer noises at ``step()``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn as nn

from .backends import get_backend
from .layout import FlatLayout
from .rules import find_rule, functorch_rule
from .validate import validate_module


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, trigger, on_grad):
        ctx.on_grad = on_grad
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        on_grad, ctx.on_grad = ctx.on_grad, None  # drop the saved activations as soon as they are used
        on_grad(grad_out)
        return grad_out, None, None


class GroupGradientCollector:
    """Turns per-group gradients into a running sum of clipped per-example gradients."""

    def __init__(self, layout: FlatLayout, noise_multiplicity: int, max_grad_norm: float,
                 loss_reduction: str, backend: str = "auto"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.layout, self.K = layout, noise_multiplicity
        self.max_grad_norm, self.loss_reduction = float(max_grad_norm), loss_reduction
        device = layout.params[0].device if layout.params else torch.device("cpu")
        self.backend = get_backend(backend, device)
        self.clipped_sum = torch.zeros(layout.size, dtype=torch.float32, device=device)
        self.num_examples = 0          # examples folded into clipped_sum since the last reset
        self.backward_calls = 0        # backward passes folded in since the last reset
        self.last_norms: torch.Tensor | None = None  # per-example norms of the last backward
        self._storage: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._written: set[int] = set()
        self._rows = 0

    # -- during backward -------------------------------------------------------------------
    def buffer_for(self, rows: int, device: torch.device) -> torch.Tensor:
        if self._buffer is None:
            if rows % self.K:
                raise ValueError(f"the loss covers {rows} rows, not a multiple of noise_multiplicity "
                                 f"K={self.K}: each example must contribute exactly K consecutive rows")
            B = rows // self.K
            if self.clipped_sum.device != device:
                raise RuntimeError(f"the model runs on {device} but the engine was set up on {self.clipped_sum.device}: "
                                   "move the model to its device before make_private (as with Opacus)")
            if self._storage is None or self._storage.shape[0] < B or self._storage.device != device:
                self._storage = torch.empty(B, self.layout.size, dtype=torch.float32, device=device)
            self._buffer, self._rows = self._storage[:B], rows
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        elif rows != self._rows:
            raise RuntimeError(f"one backward pass saw layers with {self._rows} and {rows} rows: "
                               "call backward once per forward of the private module")
        return self._buffer

    def write(self, param: nn.Parameter, per_group: torch.Tensor) -> None:
        if id(param) in self._written:
            raise RuntimeError("a parameter received two per-group gradients in one backward pass: it "
                               "is used twice (tied weights, a module called twice, or two forward "
                               "passes in one loss), which per-example clipping does not support")
        self._written.add(id(param))
        self.layout.view(self._buffer, param).copy_(per_group)

    def _end_of_backward(self) -> None:
        buffer, self._buffer = self._buffer, None
        written, self._written = self._written, set()
        if buffer is None:
            return
        for p in self.layout.params:  # parameters this loss did not touch have zero gradient
            if id(p) not in written:
                self.layout.view(buffer, p).zero_()
        B = buffer.shape[0]
        # Opacus's per-row scaling (rows for 'mean'), then the average over K rows.
        scale = (self._rows if self.loss_reduction == "mean" else 1) / self.K
        norms = self.backend.norms(buffer) * scale
        if not torch.isfinite(norms).all():
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite per-example gradients for examples {bad[:10]} of this "
                                     "batch (NaN/Inf in the loss or the model); refusing to clip them")
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.backend.weighted_sum(buffer, factors * scale, self.clipped_sum)
        self.last_norms = norms
        self.num_examples += B
        self.backward_calls += 1

    def abort(self) -> None:
        """Forget a backward pass that failed half-way (its clipped contributions were never added)."""
        self._buffer, self._written = None, set()

    def reset(self) -> None:
        self.clipped_sum.zero_()
        self.num_examples = 0
        self.backward_calls = 0


class PrivateModule(nn.Module):
    """Wraps a model so that each backward pass yields clipped per-example gradients.

    ``state_dict()`` / ``load_state_dict()`` are the wrapped model's own (no prefix), so
    checkpoints stay interchangeable with the plain model.
    """

    def __init__(self, module: nn.Module, *, noise_multiplicity: int = 1, max_grad_norm: float = 1.0,
                 loss_reduction: str = "mean", backend: str = "auto", strict: bool = False):
        super().__init__()
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
        validate_module(module)
        self._module = module
        self._register_load_state_dict_pre_hook(self._accept_plain_keys, with_module=True)
        self.noise_multiplicity = noise_multiplicity
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.collector = GroupGradientCollector(FlatLayout(self.trainable), noise_multiplicity,
                                                max_grad_norm, loss_reduction, backend)
        device = self.trainable[0].device if self.trainable else None
        self._trigger = torch.zeros((), device=device, requires_grad=True)
        self._calls: set[int] = set()
        self._in_rule = False
        self._handles = []
        for name, sub in module.named_modules():
            own = [(n, p) for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = find_rule(sub)
            if rule is None:
                message = (f"module {name!r} ({type(sub).__name__}) with trainable parameters "
                           f"{[n for n, _ in own]} has no per-group rule")
                if strict:
                    raise NotImplementedError(message + "; register one with dpdm_fast.engine.register_rule "
                                              "or pass strict=False to use the slower torch.func fallback")
                warnings.warn(message + "; using the torch.func (vmap) fallback, which is slower")
                rule = functorch_rule
            self._handles.append(sub.register_forward_hook(self._make_hook(name, sub, rule, dict(own))))

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._calls.clear()
        with self._frozen_params():
            return self._module(*args, **kwargs)

    @contextlib.contextmanager
    def _frozen_params(self) -> Iterator[None]:
        """Keep autograd from computing the ordinary weight gradients (the rules compute them per group)."""
        for p in self.trainable:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.trainable:
                p.requires_grad_(True)

    def _make_hook(self, name: str, module: nn.Module, rule, params: dict):
        collector, K = self.collector, self.noise_multiplicity

        def on_grad(inputs, grad_out):
            try:
                compute(inputs, grad_out)
            except BaseException:
                collector.abort()  # leave no half-written backward behind for the next one
                raise

        def compute(inputs, grad_out):
            buffer = collector.buffer_for(grad_out.shape[0], grad_out.device)
            if buffer.shape[0] == 0:
                for p in params.values():
                    collector.write(p, torch.zeros(0, *p.shape))
                return
            # Under autocast a layer's saved input and its output gradient can differ in dtype;
            # compute in the gradient's dtype (the buffer, norms and sums are fp32 regardless).
            inputs = tuple(a.to(grad_out.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                           and a.dtype != grad_out.dtype else a for a in inputs)
            self._in_rule = True
            try:
                per_group = rule(module, inputs, grad_out, K)
            finally:
                self._in_rule = False
            for pname, p in params.items():
                collector.write(p, per_group[pname])

        def hook(mod, inputs, output):
            if self._in_rule or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor):
                raise NotImplementedError(f"module {name!r} returns {type(output).__name__}; per-group "
                                          "gradients need layers that return one tensor")
            if id(mod) in self._calls:
                raise RuntimeError(f"module {name!r} was called twice in one forward pass: its parameters "
                                   "would be used twice, which per-example clipping does not support")
            self._calls.add(id(mod))
            saved = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in inputs)
            return _Tap.apply(output, self._trigger, lambda g: on_grad(saved, g))

        return hook

    # -- plumbing --------------------------------------------------------------------------
    def remove_hooks(self) -> nn.Module:
        """Detach the engine and return the plain model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
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
