"""The wrapped model: per-group gradients captured by hooks, clipped at the end of each backward.

How the ordinary weight gradient is avoided: while a layer with trainable parameters runs its
``forward``, those parameters are marked ``requires_grad=False`` (a pre-hook freezes them, the
forward hook restores them), so autograd records no weight-gradient work. The layer's output is
passed through ``_Tap``, an identity whose backward hands the output gradient and the layer's
inputs (saved with ``save_for_backward``, so autograd's in-place checks and
``torch.utils.checkpoint`` apply to them) to the layer's rule. The rule writes per-group
gradients into one flat (B, P) buffer (``GroupGradientCollector``), which is clipped per example
when the backward pass ends.

What keeps the guarantee honest (each is a test in ``tests/test_engine_hardening.py``):
- a parameter used outside its own layer's forward would get an ordinary, unclipped gradient:
  a post-accumulate-grad hook on every trainable parameter refuses it;
- the set of trainable parameters is checked at every forward (newly trainable -> refused,
  newly frozen -> stays frozen and gets no update);
- only a full ``backward()`` folds per-example gradients in; ``torch.autograd.grad`` passes the
  engine by (input gradients only), double backward and a second backward over one graph are refused.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .collector import GroupGradientCollector
from .layout import FlatLayout
from .rules import find_rule, functorch_rule
from .validate import validate_module


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
        try:
            site.compute(self.names, args, kwargs, grad_out)
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
        call = _Call(self, names, [_TENSOR if isinstance(a, torch.Tensor) else a for a in args],
                     {k: _TENSOR if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return _Tap.apply(output, self.owner._trigger, call, *saved)

    def _check_call(self, args, kwargs, output) -> None:
        rows = output.shape[0] if output.dim() else None
        where = f"{self.name!r} ({type(self.module).__name__})"
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
    def compute(self, names: list, args: tuple, kwargs: dict, grad_out: torch.Tensor) -> None:
        owner = self.owner
        collector = owner.collector
        buffer = collector.buffer_for(grad_out.shape[0], grad_out.device)
        if buffer.shape[0] == 0:
            for n in names:
                collector.write(self.params[n], grad_out.new_zeros(0, *self.params[n].shape), self._full(n))
            return
        # Under autocast a layer's saved input and its output gradient can differ in dtype;
        # compute in the gradient's dtype (the buffer, norms and sums are fp32 regardless).
        cast = lambda a: a.to(grad_out.dtype) if (isinstance(a, torch.Tensor) and a.is_floating_point()  # noqa: E731
                                                 and a.dtype != grad_out.dtype) else a
        args = tuple(cast(a) for a in args)
        owner._in_rule = True
        try:
            if self.spec is not None:
                per_group = self.spec.rule(self.module, args, grad_out, collector.K)
            else:
                per_group = functorch_rule(self.module, args, grad_out, collector.K,
                                           {k: cast(v) for k, v in kwargs.items()})
        finally:
            owner._in_rule = False
        for n in names:
            if n not in per_group:
                raise RuntimeError(f"requires_grad of {self._full(n)} changed between forward and backward")
            collector.write(self.params[n], per_group[n], self._full(n))

    def _full(self, pname: str) -> str:
        return pname if self.name == "<root>" else f"{self.name}.{pname}"


class PrivateModule(nn.Module):
    """Wraps a model so that each backward pass yields clipped per-example gradients.

    ``state_dict()`` / ``load_state_dict()`` are the wrapped model's own (no prefix), so
    checkpoints stay interchangeable with the plain model. ``noise_multiplicity``,
    ``max_grad_norm`` and ``loss_reduction`` live in ``collector`` (one source of truth for the
    clipping and, through the DP optimizer, the noise).
    """

    def __init__(self, module: nn.Module, *, noise_multiplicity: int = 1, max_grad_norm: float = 1.0,
                 loss_reduction: str = "mean", backend: str = "auto", strict: bool = False,
                 allow_direct_calls: bool = False):
        super().__init__()
        if isinstance(module, PrivateModule):
            raise ValueError("the module is already a PrivateModule: pass its plain model (private.remove_hooks())")
        validate_module(module)
        self._module = module
        self._register_load_state_dict_pre_hook(self._accept_plain_keys, with_module=True)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.collector = GroupGradientCollector(FlatLayout(self.trainable), noise_multiplicity,
                                                max_grad_norm, loss_reduction, backend)
        device = self.trainable[0].device if self.trainable else None
        self._trigger = torch.zeros((), device=device, requires_grad=True)
        self._trigger_node = torch.autograd.graph.get_gradient_edge(self._trigger).node
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._calls: set[int] = set()
        self._frozen: dict[int, list] = {}
        self._depth = 0           # nesting of forward calls of the wrapped model
        self._via_wrapper = 0     # forward calls that came through PrivateModule.forward
        self._allow_direct = allow_direct_calls
        self._in_rule = False
        self._closed = False
        self._handles = []
        layout_ids = set(self.collector.layout.slots)
        for name, sub in module.named_modules():
            own = {n: p for n, p in sub.named_parameters(recurse=False) if id(p) in layout_ids}
            if not own:
                continue
            site = _Site(self, name, sub, own, strict)
            self._handles.append(sub.register_forward_pre_hook(site.pre_hook, with_kwargs=True))
            self._handles.append(sub.register_forward_hook(site.forward_hook, with_kwargs=True, prepend=True,
                                                           always_call=True))
        self._handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
        self._handles.append(module.register_forward_hook(self._exit, always_call=True))
        for p in self.trainable:
            self._handles.append(p.register_post_accumulate_grad_hook(self._ordinary_gradient))

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
        self._via_wrapper += 1
        try:
            return self._module(*args, **kwargs)
        finally:
            self._via_wrapper -= 1

    def _enter(self, module, args) -> None:
        # `_exit` runs even when this hook raises (always_call), so count first, then check.
        self._depth += 1
        if self._depth > 1 or _in_backward() or not torch.is_grad_enabled():
            return   # nested call, recomputation by torch.utils.checkpoint, or no gradients
        if not self._via_wrapper and not self._allow_direct:
            raise RuntimeError("this model was wrapped by make_private: call the private module it returned "
                               "(or private.remove_hooks() to get the plain model back); under "
                               "torch.no_grad() the model can be used as is, e.g. for sampling")
        self._restore_frozen()
        self._calls.clear()
        self._check_trainable()

    def _exit(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._restore_frozen()

    def _restore_frozen(self) -> None:
        """Undo freezes a failed forward left behind (the hooks normally undo their own)."""
        for frozen in self._frozen.values():
            for p in frozen:
                p.requires_grad_(True)
        self._frozen.clear()

    def _check_trainable(self) -> None:
        slots = self.collector.layout.slots
        for name, p in self._module.named_parameters():
            if p.requires_grad and id(p) not in slots:
                raise RuntimeError(f"parameter {name!r} requires grad but was not trainable when the model was "
                                   "wrapped, so its gradient would be neither clipped nor noised: freeze it again "
                                   "(requires_grad_(False)) or wrap the model again with make_private")
        active = frozenset(id(p) for p in self.trainable if p.requires_grad)
        self.collector.set_active(active, self._names)

    def _ordinary_gradient(self, p: torch.Tensor) -> None:
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
