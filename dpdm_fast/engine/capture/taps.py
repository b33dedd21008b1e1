"""The autograd side of capture: an identity on each layer's output whose backward feeds the layer's rule."""
from __future__ import annotations

import torch

from . import rule_runner

TENSOR = object()  # placeholder for a saved tensor in an argument template


class Tap(torch.autograd.Function):
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


class Call:
    """One forward call of a layer: which parameters were trainable, and how to rebuild its arguments."""

    def __init__(self, site, names: list, args_template: list, kwargs_template: dict):
        self.site, self.names = site, names
        self.args_template, self.kwargs_template = args_template, kwargs_template
        self.consumed = False

    def collect(self, ctx, grad_out: torch.Tensor) -> None:
        site, state = self.site, self.site.state
        if torch.is_grad_enabled():
            raise RuntimeError("backward(create_graph=True) / torch.autograd.grad(create_graph=True) through the "
                               "private module (a gradient penalty, double backward) is not supported: "
                               "per-example gradients are collected for first-order losses only")
        if not torch._C._will_engine_execute_node(state.trigger_node):
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
        args = tuple(next(it) if a is TENSOR else a for a in self.args_template)
        kwargs = {k: next(it) if v is TENSOR else v for k, v in self.kwargs_template.items()}
        extra = tuple(it)  # what the rule's save() kept
        try:
            rule_runner.compute(site, self.names, args, kwargs, grad_out, extra)
        except BaseException:
            state.collector.abort()  # leave no half-written backward behind for the next one
            raise
