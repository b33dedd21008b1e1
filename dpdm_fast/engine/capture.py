"""Per-layer capture: hooks on each layer with trainable parameters feed its rule during backward.

``_Site`` is one such layer. Its pre-hook freezes the layer's parameters while the layer runs (so
autograd does no weight-gradient work); its forward hook passes the output through ``_Tap``, an
identity whose backward hands the output gradient and the layer's inputs (saved with
``save_for_backward``, so autograd's in-place checks and ``torch.utils.checkpoint`` apply to them)
to the layer's rule, which writes per-group gradients into the collector's flat buffer.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .rules import find_rule, functorch_rule

if TYPE_CHECKING:
    from .private_module import PrivateModule


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Tap(torch.autograd.Function):
    """Identity on a layer's output; its backward feeds the layer's rule."""

    @staticmethod
    def forward(ctx, out, trigger, call, *saved):
        ctx.call, ctx.n_saved = call, len(saved)
        ctx.save_for_backward(*saved)
        # A fresh alias, not a view: an in-place op on the layer's output (ReLU(inplace=True))
        # is then ordinary autograd, and shares the version counter with `out`.
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.call.collect(ctx, grad_out)
        return (grad_out, None, None) + (None,) * ctx.n_saved


class _Call:
    """One forward call of a layer: which parameters were trainable, and how to rebuild its arguments."""

    def __init__(self, site: "_Site", names: list, args_template: list, kwargs_template: dict):
        self.site, self.names = site, names
        self.args_template, self.kwargs_template = args_template, kwargs_template
        self.consumed = False

    def collect(self, ctx, grad_out: torch.Tensor) -> None:
        site, owner = self.site, self.site.owner
        if torch.is_grad_enabled():
            raise RuntimeError("backward(create_graph=True) / torch.autograd.grad(create_graph=True) through the "
                               "private module (a gradient penalty, double backward) is not supported: "
                               "per-example gradients are collected for first-order losses only")
        if not torch._C._will_engine_execute_node(owner._trigger_node):
            return  # torch.autograd.grad / backward(inputs=...): input gradients only, the engine is not involved
        if self.consumed:
            raise RuntimeError(f"a second backward through the same forward pass reached {site.name!r} "
                               "(backward(retain_graph=True) twice?): each forward's per-example gradients "
                               "are collected once; run a new forward for each backward")
        self.consumed = True
        try:
            saved = ctx.saved_tensors
        except RuntimeError as e:
            if "modified by an inplace operation" in str(e):
                raise RuntimeError(f"an input of {site.name!r} ({type(site.module).__name__}) was modified in place "
                                   "after the layer ran, so its per-example gradient cannot be computed: make the "
                                   "op that modifies it out-of-place (e.g. inplace=False, or x = x + y instead of "
                                   "x += y)") from e
            raise
        it = iter(saved)
        args = tuple(next(it) if a is _TENSOR else a for a in self.args_template)
        kwargs = {k: next(it) if v is _TENSOR else v for k, v in self.kwargs_template.items()}
        extra = tuple(it)  # what the rule's save() kept
        try:
            site.compute(self.names, args, kwargs, grad_out, extra)
        except BaseException:
            owner.collector.abort()  # leave no half-written backward behind for the next one
            raise


_TENSOR = object()  # placeholder for a saved tensor in an argument template


class _Site:
    """A layer with trainable parameters: its rule and the hooks that feed it."""

    def __init__(self, owner: "PrivateModule", name: str, module: nn.Module, params: dict, strict: bool):
        self.owner, self.name, self.module, self.params = owner, name or "<root>", module, params
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
        # the backend's fused kernel for this layer, where it has one (the torch rule stays the reference)
        self.kernel = owner.collector.backend.kernel_rules.get(spec.cls) if spec is not None else None

    @property
    def computed_by(self) -> str:
        """Which code computes this layer's per-group gradients."""
        if self.spec is None:
            return "torch.func fallback"
        return f"{self.owner.collector.backend.name} kernel" if self.kernel is not None else "torch rule"

    # -- forward ------------------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        owner = self.owner
        if owner._in_rule or not torch.is_grad_enabled():
            return None
        in_bwd = _in_backward()
        if in_bwd and id(module) not in owner._calls:
            raise RuntimeError(f"{self.name!r} ran inside a backward pass without having run with gradients in the "
                               "forward: torch.utils.checkpoint(use_reentrant=True) clips each checkpointed "
                               "segment separately, which weakens the guarantee; use use_reentrant=False "
                               "(supported and tested)")
        if self.spec is not None:
            self._check_still_the_rules_layer(module)
        if not in_bwd:
            if owner._depth == 0:
                raise RuntimeError(f"{self.name!r} of a model wrapped by make_private was called directly with "
                                   "gradients enabled: call the private module that make_private returned (or "
                                   "private.remove_hooks() to get the plain model back); under torch.no_grad() "
                                   "the wrapped model can be used as is, e.g. for sampling")
            if id(module) in owner._calls:
                raise RuntimeError(f"module {self.name!r} was called twice in one forward pass: its parameters "
                                   "would be used twice, which per-example clipping does not support")
            owner._calls.add(id(module))
        frozen = [p for p in self.params.values() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        owner._frozen[id(module)] = frozen
        return None

    def forward_hook(self, module, args, kwargs, output):
        frozen = self.owner._frozen.pop(id(module), None)
        if frozen is None:
            return None
        for p in frozen:
            p.requires_grad_(True)
        if output is None or not frozen:   # forward raised, or every parameter is frozen by the user
            return None
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(f"module {self.name!r} returns {type(output).__name__}; per-group "
                                      "gradients need layers with trainable parameters to return one tensor")
        self._check_call(args, kwargs, output)
        ids = {id(p) for p in frozen}
        names = [n for n, p in self.params.items() if id(p) in ids]
        saved = [a.detach() for a in args if isinstance(a, torch.Tensor)]
        saved += [v.detach() for v in kwargs.values() if isinstance(v, torch.Tensor)]
        if self.spec is not None and self.spec.save is not None:
            saved += [t.detach() for t in self.spec.save(module, args, output) or ()]
        call = _Call(self, names, [_TENSOR if isinstance(a, torch.Tensor) else a for a in args],
                     {k: _TENSOR if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return _Tap.apply(output, self.owner._trigger, call, *saved)

    def _check_still_the_rules_layer(self, module) -> None:
        """Options checked at wrap time can be changed afterwards (emb.max_norm = 1.0; conv.forward = ...)."""
        if any(m in module.__dict__ for m in self.spec.methods):
            raise NotImplementedError(f"{self.name!r}: {self.spec.methods} replaced on the instance, so its "
                                      f"{type(module).__name__} rule no longer describes its computation; subclass "
                                      "the layer instead (subclasses get the torch.func fallback) and wrap again")
        if self.spec.check is not None:
            self.spec.check(module)

    def _check_call(self, args, kwargs, output) -> None:
        rows = output.shape[0] if output.dim() else None
        where = f"{self.name!r} ({type(self.module).__name__})"
        owner = self.owner
        if not _in_backward() and owner._rows is not None and rows != owner._rows:
            raise ValueError(f"{where} returned {rows} rows, but the private module was called with {owner._rows}: "
                             "every layer with trainable parameters must keep the model's rows on dim 0 (a layer "
                             "applied to (N*T, D) reshaped from (N, T, D), or to a tensor without the batch "
                             "dimension such as torch.arange(T), would mix examples); reshape around it instead")
        nested = [type(a).__name__ for a in (*args, *kwargs.values())
                  if not isinstance(a, torch.Tensor) and any(isinstance(t, torch.Tensor) for t in tree_flatten(a)[0])]
        if nested:
            raise NotImplementedError(f"{where} got tensors inside {nested} arguments: pass each tensor as its own "
                                      "positional or keyword argument, so that its rows can be split into examples")
        if self.spec is not None:
            x = args[0] if args else None
            if kwargs or not isinstance(x, torch.Tensor):
                raise NotImplementedError(f"{where} must be called with its input as the one positional argument "
                                          "for its per-group rule")
            if not self.spec.input_ndim(x.dim()) or x.shape[0] != rows:
                raise ValueError(f"{where} got an input of shape {tuple(x.shape)} and returned {tuple(output.shape)}: "
                                 "per-example gradients need a batched input with the rows on dim 0")
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors or rows is None:
            raise NotImplementedError(f"{where} has no tensor input with rows on dim 0; the torch.func fallback "
                                      "cannot split it into examples: register a rule for it")
        bad = [tuple(t.shape) for t in tensors if t.dim() == 0 or t.shape[0] != rows]
        if bad:
            raise NotImplementedError(f"{where} (torch.func fallback) got tensor arguments of shapes {bad}, whose "
                                      f"dim 0 is not the {rows} rows of its output: the fallback treats every tensor "
                                      "argument as per-row; pass constants as buffers or non-tensor arguments, or "
                                      "register a rule")

    # -- backward -----------------------------------------------------------------------------
    def compute(self, names: list, args: tuple, kwargs: dict, grad_out: torch.Tensor, extra: tuple = ()) -> None:
        owner = self.owner
        collector = owner.collector
        if collector.begin(grad_out.shape[0], grad_out.device) == 0:
            for n in names:
                collector.write(self.params[n], grad_out.new_zeros(0, *self.params[n].shape), self._full(n))
            return
        # Under autocast a layer's saved input and its output gradient can differ in dtype;
        # compute in the gradient's dtype (the buffer, norms and sums are fp32 regardless).
        cast = lambda a: a.to(grad_out.dtype) if (isinstance(a, torch.Tensor) and a.is_floating_point()  # noqa: E731
                                                 and a.dtype != grad_out.dtype) else a
        args = tuple(cast(a) for a in args)
        object.__setattr__(owner, "_in_rule", True)  # (skips nn.Module.__setattr__'s bookkeeping)
        try:
            if self.spec is None:
                per_group = functorch_rule(self.module, args, grad_out, collector.K,
                                           {k: cast(v) for k, v in kwargs.items()})
            elif self.kernel is not None and self._run_kernel(names, args, grad_out, extra):
                return
            else:
                options = {"saved": extra or None} if self.spec.save is not None else {}
                if self.spec.writes_out and grad_out.dtype == torch.float32:
                    # the rule writes straight into the buffer's blocks (no copy pass)
                    options["out"] = {n: collector.target(self.params[n]) for n in names}
                per_group = self.spec.rule(self.module, args, grad_out, collector.K, **options)
        finally:
            object.__setattr__(owner, "_in_rule", False)
        for n in names:
            if n not in per_group:
                raise RuntimeError(f"requires_grad of {self._full(n)} changed between forward and backward")
            collector.write(self.params[n], per_group[n], self._full(n))

    def _run_kernel(self, names: list, args: tuple, grad_out: torch.Tensor, extra: tuple) -> bool:
        """The fused kernel writes the blocks and their squared norms; False when it does not cover this call."""
        collector = self.owner.collector
        params = [self.params[n] for n in names]
        out = {n: collector.target(p) for n, p in zip(names, params)}
        sq = {n: collector.squared_norm_row(p) for n, p in zip(names, params)}
        if not self.kernel(self.module, args[0], grad_out, collector.K, out, sq, extra or None):
            return False
        for n, p in zip(names, params):
            collector.written_by_kernel(p, self._full(n))
        return True

    def _full(self, pname: str) -> str:
        return pname if self.name == "<root>" else f"{self.name}.{pname}"


