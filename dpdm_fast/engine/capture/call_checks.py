"""Checks of one layer call in the forward: what a per-group rule (or the fallback) can split into examples."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from .forward_state import in_backward
from .rules.embedding_bag import bag_rows


def check_still_the_rules_layer(site, module) -> None:
    """Options checked at wrap time can be changed afterwards (emb.max_norm = 1.0; conv.forward = ...)."""
    spec = site.spec
    if any(m in module.__dict__ for m in spec.methods):
        raise NotImplementedError(f"{site.name!r}: {spec.methods} replaced on the instance, so its "
                                  f"{type(module).__name__} rule no longer describes its computation; subclass "
                                  "the layer instead (subclasses get the torch.func fallback) and wrap again")
    if spec.check is not None:
        spec.check(module)


def check_call(site, args, kwargs, output) -> None:
    """The layer's rows are the model's rows, and its tensors are arguments the rule can split."""
    dim = site.batch_dim
    rows = output.shape[dim] if output.dim() > dim else None
    where = f"{site.name!r} ({type(site.module).__name__})"
    model_rows = site.state.rows
    if dim and rows is not None:
        _check_sequence_first(site, where, output, rows)
    if not in_backward() and model_rows is not None and rows != model_rows:
        raise ValueError(f"{where} returned {rows} rows, but the private module was called with {model_rows}: "
                         "every layer with trainable parameters must keep the model's rows on its batch dimension (a layer "
                         "applied to (N*T, D) reshaped from (N, T, D), or to a tensor without the batch "
                         "dimension such as torch.arange(T), would mix examples); reshape around it instead")
    nested = [type(a).__name__ for a in (*args, *kwargs.values())
              if not isinstance(a, torch.Tensor) and any(isinstance(t, torch.Tensor) for t in tree_flatten(a)[0])]
    if nested:
        raise NotImplementedError(f"{where} got tensors inside {nested} arguments: pass each tensor as its own "
                                  "positional or keyword argument, so that its rows can be split into examples")
    if site.spec is not None:
        x = args[0] if args else None
        if kwargs or not isinstance(x, torch.Tensor):
            got = f" (got keyword arguments {sorted(kwargs)})" if kwargs else ""
            raise NotImplementedError(f"{where} must be called with positional arguments only, its input first, "
                                      f"for its per-group rule{got}: pass tensors positionally (e.g. EmbeddingBag: "
                                      "bag(input, offsets, per_sample_weights))")
        if not site.spec.input_ndim(x.dim()) or _rule_input_rows(site.module, args, dim) != rows:
            raise ValueError(f"{where} got an input of shape {tuple(x.shape)} and returned {tuple(output.shape)}: "
                             f"per-example gradients need a batched input with the rows on dim {dim}")
        return
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors or rows is None:
        raise NotImplementedError(f"{where} has no tensor input with rows on dim 0; the torch.func fallback "
                                  "cannot split it into examples: register a rule for it")
    bad = [tuple(t.shape) for t in tensors if t.dim() <= dim or t.shape[dim] != rows]
    if bad:
        raise NotImplementedError(f"{where} (torch.func fallback) got tensor arguments of shapes {bad}, whose "
                                  f"dim {dim} is not the {rows} rows of its output: the fallback treats every tensor "
                                  "argument as per-row; pass constants as buffers or non-tensor arguments, or "
                                  "register a rule")


def _check_sequence_first(site, where: str, output, rows: int) -> None:
    """With batch_first=False a layer's rows are on dim 1. When dim 0 has the same size (sequence length
    = batch size), a layer that actually runs batch-first would pass the row check with its time steps
    taken for examples (each example in every group): the layout must have been confirmed by an
    earlier call where only dim 1 had the rows."""
    if output.shape[0] != rows:
        site.layout_seen = True
    elif rows <= site.state.collector.K:
        return   # one example (or none): every row is its, whichever dim holds them
    elif not site.layout_seen:
        raise ValueError(f"{where}: with batch_first=False its output {tuple(output.shape)} has the batch's {rows} "
                         "rows on both dim 0 and dim 1, so the engine cannot tell a sequence-first layer from a "
                         "batch-first one (whose time steps would be taken for examples, each example then in every "
                         "group); the first batch must have a size different from the sequence length (later "
                         "batches of that size are then fine): with fixed-size batches, change the batch size or "
                         "the sequence length")


# -- per-rule call checks ----------------------------------------------------------------------------------
def _rule_input_rows(module, args: tuple, dim: int) -> int | None:
    """The rows of a rule layer's input: its first argument's size on ``dim``, except for an EmbeddingBag
    (rows on dim 0), whose rows are its bags: with a 1-D input and offsets, one per offset."""
    x = args[0]
    if dim == 0 and isinstance(module, torch.nn.EmbeddingBag):
        return bag_rows(module, args)
    return x.shape[dim] if x.dim() > dim else None
