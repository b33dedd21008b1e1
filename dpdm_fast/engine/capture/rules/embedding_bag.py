import torch
import torch.nn as nn

from .embedding import check_lookup_options
from .registry import block, groups, register_rule

_MODES = {"sum": 0, "mean": 1, "max": 2}


def _check_embedding_bag(module: nn.EmbeddingBag) -> None:
    check_lookup_options(module)
    if module.mode not in _MODES:
        raise NotImplementedError(f"EmbeddingBag(mode={module.mode!r}) has no per-group rule (sum, mean, max)")


def bag_rows(module: nn.EmbeddingBag, args: tuple) -> int:
    """The rows of an EmbeddingBag call: its bags (a 2-D input's rows, or one per offset of a 1-D input)."""
    x = args[0]
    if x.dim() != 1:
        return x.shape[0]
    offsets = args[1] if len(args) > 1 else None
    if not isinstance(offsets, torch.Tensor):
        raise NotImplementedError("EmbeddingBag with a 1-D input needs its offsets as the second positional "
                                  "argument for its per-group rule")
    return offsets.shape[0] - int(module.include_last_offset)


def _bags(module: nn.EmbeddingBag, inputs: tuple):
    """(flat indices (T,), bag of each (T,), weight of each (T,) or None, bags N, flat offsets), as the
    forward splits them: a 2-D input's rows are its bags; a 1-D input is cut at its offsets (with
    include_last_offset, indices past the last offset belong to no bag: bag -1)."""
    idx = inputs[0]
    offsets = inputs[1] if len(inputs) > 1 else None
    psw = inputs[2] if len(inputs) > 2 else None
    if idx.dim() == 2:
        if offsets is not None:
            raise ValueError("EmbeddingBag with a 2-D input takes no offsets")
        N, L = idx.shape
        bag = torch.arange(N, device=idx.device).repeat_interleave(L)
        flat_offsets = torch.arange(0, N * L, max(L, 1), dtype=idx.dtype, device=idx.device)
        return idx.reshape(-1), bag, None if psw is None else psw.reshape(-1), N, flat_offsets, False
    if not isinstance(offsets, torch.Tensor):
        raise NotImplementedError("EmbeddingBag with a 1-D input needs its offsets passed as the second "
                                  "positional argument for its per-group rule")
    N = offsets.shape[0] - int(module.include_last_offset)
    pos = torch.arange(idx.shape[0], device=idx.device)
    bag = torch.bucketize(pos, offsets[:N].to(pos.dtype), right=True) - 1
    if module.include_last_offset:
        bag = torch.where(pos < offsets[N], bag, -1)
    return idx, bag, psw, N, offsets, module.include_last_offset


@register_rule(nn.EmbeddingBag, params=("weight",), check=_check_embedding_bag, input_ndim=lambda d: d in (1, 2))
def embedding_bag_rule(module: nn.EmbeddingBag, inputs: tuple, g: torch.Tensor, K: int,
                       out: dict | None = None) -> dict:
    """Each bag is one row. sum / mean: scatter-add each index's share of its bag's output gradient
    (its per_sample_weight, or 1 / the bag's count of non-padding indices) into its example's copy of
    the table row; padding_idx entries get none. max: each bag's output gradient goes, per dimension,
    to the table row that won the max, which the forward's own kernel (``torch.embedding_bag``) names.

    ``inputs``: (input,) with a 2-D input, or (input, offsets[, per_sample_weights]) given positionally
    (the engine refuses keyword arguments of a layer with a rule at call time)."""
    if not module.weight.requires_grad:
        return {}
    idx, bag, psw, N, offsets, include_last = _bags(module, inputs)
    if g.shape[0] != N:
        raise ValueError(f"EmbeddingBag: {N} bags but an output gradient of {g.shape[0]} rows")
    groups(g, K)                                        # checks the bags are a multiple of K
    B = N // K
    V, D = module.weight.shape
    target = block(out, "weight")
    grad = torch.zeros(B * V, D, dtype=g.dtype, device=g.device) if target is None else target.view(B * V, D).zero_()
    if N == 0 or idx.numel() == 0:
        return {"weight": grad.view(B, V, D)}
    keep = bag >= 0
    if module.padding_idx is not None:
        keep &= idx != module.padding_idx
    bag_c = bag.clamp(min=0)
    count = torch.zeros(N, dtype=g.dtype, device=g.device).index_add_(0, bag_c, keep.to(g.dtype))
    if module.mode == "max":
        with torch.no_grad():
            _, _, _, winner = torch.embedding_bag(module.weight.detach(), idx, offsets, False, 2, False, None,
                                                  include_last, module.padding_idx)
        nonempty = (count > 0)[:, None]
        rows = (torch.arange(N, device=g.device) // K * V)[:, None] + torch.where(nonempty, winner, 0)
        grad.scatter_add_(0, rows, g * nonempty.to(g.dtype))
        return {"weight": grad.view(B, V, D)}
    coef = keep.to(g.dtype)
    if psw is not None:
        coef = coef * psw.to(g.dtype)
    if module.mode == "mean":
        coef = coef / count.clamp(min=1)[bag_c]
    flat = bag_c // K * V + idx
    grad.index_add_(0, flat, g[bag_c] * coef[:, None])
    return {"weight": grad.view(B, V, D)}
