"""During backward: one layer call's per-group gradients, by its kernel rule, its torch rule or the
torch.func fallback, written into the collector's buffer."""
from __future__ import annotations

import torch

from .rules import functorch_rule


def compute(site, names: list, args: tuple, kwargs: dict, grad_out: torch.Tensor, extra: tuple = ()) -> None:
    """Write the per-group gradients of ``site``'s parameters ``names`` for this call into the buffer."""
    state = site.state
    collector = state.collector
    if site.batch_dim:   # sequence-first (batch_first=False): rules take the rows on dim 0
        args, kwargs, grad_out = _rows_first(args, kwargs, grad_out, site.batch_dim)
        extra = ()       # (statistics saved in the forward's layout: the rule recomputes them)
    if collector.begin(grad_out.shape[0], grad_out.device) == 0:
        for n in names:
            collector.write(site.params[n], grad_out.new_zeros(0, *site.params[n].shape), site.full_name(n))
        return
    # Under autocast a layer's saved input and its output gradient can differ in dtype;
    # compute in the gradient's dtype (the buffer, norms and sums are fp32 regardless).
    cast = lambda a: a.to(grad_out.dtype) if (isinstance(a, torch.Tensor) and a.is_floating_point()  # noqa: E731
                                             and a.dtype != grad_out.dtype) else a
    args = tuple(cast(a) for a in args)
    # A parameter used again in this backward (a layer run at several time steps, tied weights): its block
    # already holds the other uses' gradients, so this use's are computed apart and added to it (``write``).
    written = [collector.written(site.params[n]) for n in names]
    first_use, reuse = not any(written), all(written)
    options: dict = {}
    state.in_rule = True
    try:
        if site.spec is None:
            per_group = functorch_rule(site.module, args, grad_out, collector.K,
                                       {k: cast(v) for k, v in kwargs.items()})
        elif site.kernel is not None and first_use and _run_kernel(site, names, args, grad_out, extra):
            return
        else:
            if site.spec.save is not None:
                options["saved"] = extra or None
            fp32 = grad_out.dtype == torch.float32
            if site.spec.writes_out and fp32 and first_use:
                # the rule writes straight into the buffer's blocks (no copy pass)
                options["out"] = {n: collector.target(site.params[n]) for n in names}
            elif site.spec.accumulates and fp32 and reuse:
                # a later use: the rule adds into the blocks (e.g. in the GEMM), no temporary
                options.update(out={n: collector.target(site.params[n]) for n in names}, accumulate=True)
            per_group = site.spec.rule(site.module, args, grad_out, collector.K, **options)
    finally:
        state.in_rule = False
    for n in names:
        if n not in per_group:
            raise RuntimeError(f"requires_grad of {site.full_name(n)} changed between forward and backward")
        collector.write(site.params[n], per_group[n], site.full_name(n), accumulated="accumulate" in options)


def _run_kernel(site, names: list, args: tuple, grad_out: torch.Tensor, extra: tuple) -> bool:
    """The fused kernel writes the blocks and their squared norms; False when it does not cover this call."""
    collector = site.state.collector
    params = [site.params[n] for n in names]
    out = {n: collector.target(p) for n, p in zip(names, params)}
    sq = {n: collector.squared_norm_row(p) for n, p in zip(names, params)}
    if not site.kernel(site.module, args[0], grad_out, collector.K, out, sq, extra or None):
        return False
    for n, p in zip(names, params):
        collector.written_by_kernel(p, site.full_name(n))
    return True


def _rows_first(args: tuple, kwargs: dict, grad_out: torch.Tensor, dim: int) -> tuple:
    """The call's tensors with their rows (on ``dim``) moved to dim 0, contiguous as the rules expect."""
    move = lambda t: t.movedim(dim, 0).contiguous() if isinstance(t, torch.Tensor) and t.dim() > dim else t  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}, move(grad_out)
