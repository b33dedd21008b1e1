"""The rule registry: ``register_rule`` / ``find_rule``, and the helpers every rule file uses."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn

Rule = Callable[[nn.Module, tuple, torch.Tensor, int], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RuleSpec:
    rule: Rule
    cls: type                                   # the class the rule was written for
    params: frozenset                           # parameter names the rule computes
    methods: tuple                              # methods whose override invalidates the rule
    check: Callable[[nn.Module], None] | None   # raises NotImplementedError for unsupported options
    input_ndim: Callable[[int], bool]           # accepted rank of the (batched) input
    writes_out: bool = False                    # takes out={name: (B, *shape) buffer block}
    save: Callable | None = None                # save(module, args, output) -> extra tensors for the rule
    accumulates: bool = False                   # takes accumulate=True: add into the out= blocks


RULES: Dict[type, RuleSpec] = {}


def register_rule(*module_types: type, params: Sequence[str] = ("weight", "bias"),
                  methods: Sequence[str] = ("forward",), check: Callable[[nn.Module], None] | None = None,
                  input_ndim: Callable[[int], bool] = lambda d: d >= 2,
                  save: Callable | None = None) -> Callable[[Rule], Rule]:
    """Register ``fn(module, inputs, grad_output, K) -> {param_name: (B, *shape)}`` for these types.

    ``params``: the parameter names the rule computes; ``methods``: methods of the class whose
    override by a subclass means the rule no longer describes the computation; ``check(module)``:
    raise ``NotImplementedError`` at wrap time for layer options the rule does not support;
    ``input_ndim``: which ranks of the first input are batched inputs (rows on dim 0).

    A rule may take a keyword argument ``out``: then it is given ``out={name: block}``, the fp32
    (B, *shape) blocks of the engine's buffer for the parameters it must compute, and may write
    its results there (e.g. ``torch.bmm(..., out=out.get("weight"))``) and return those blocks,
    which saves the engine a copy. Without fp32 gradients (autocast) it is called without ``out``.

    ``save(module, args, output)``: called after the layer's forward; the tensors it returns (or
    None) are kept for backward and passed to the rule as ``saved=`` (e.g. statistics the forward
    computed anyway, so the rule need not recompute them).

    A rule that also takes ``accumulate`` is called with ``accumulate=True`` (and ``out``) for a later
    use of parameters used several times in one backward (a layer run at every time step): it must
    then add its gradients to the blocks instead of overwriting them.
    """
    def wrap(fn: Rule) -> Rule:
        signature = inspect.signature(fn).parameters
        writes_out, accumulates = "out" in signature, "accumulate" in signature
        for t in module_types:
            RULES[t] = RuleSpec(fn, t, frozenset(params), tuple(methods), check, input_ndim, writes_out, save,
                                accumulates)
        return fn
    return wrap


def find_rule(module: nn.Module) -> RuleSpec | None:
    """The rule of the module's nearest registered class, if it applies to this module.

    None (-> the torch.func fallback) when a subclass overrides a method the rule depends on
    (a weight-standardised conv, a scaled linear) or has parameters the rule does not compute.
    """
    for cls in type(module).__mro__:
        if cls in RULES:
            spec = RULES[cls]
            if any(getattr(type(module), m, None) is not getattr(cls, m, None) or m in module.__dict__
                   for m in spec.methods):
                return None
            own = {n for n, _ in module.named_parameters(recurse=False)}
            if not own <= spec.params:
                return None
            return spec
    return None


def groups(t: torch.Tensor, K: int) -> torch.Tensor:
    """View (B*K, ...) rows as (B, K, ...)."""
    if t.shape[0] % K:
        raise ValueError(f"{t.shape[0]} rows is not a multiple of the noise multiplicity K={K}: "
                         "each example must contribute exactly K consecutive rows")
    return t.reshape(t.shape[0] // K, K, *t.shape[1:])


def block(out: dict | None, name: str) -> torch.Tensor | None:
    """The buffer block to write ``name``'s per-group gradients into, or None (allocate one)."""
    return None if out is None else out.get(name)
