"""Opacus's ``SequenceBias`` (the bias_k / bias_v of ``DPMultiheadAttention``), when Opacus is installed."""
import torch

from .registry import block, groups, register_rule

try:
    from opacus.layers.dp_multihead_attention import SequenceBias
except ImportError:  # dpdm_fast's engine works without Opacus: then there is no such layer to cover
    SequenceBias = None


def sequence_bias_rule(module, inputs: tuple, g: torch.Tensor, K: int, out: dict | None = None) -> dict:
    """The bias is appended as one extra time step: its gradient for a row is that row's output gradient
    at the last time step. The engine hands rules the rows on dim 0 (a batch_first=False model's dim 1 moved
    there), so g is (N, L+1, E) whatever the layer's own ``batch_first``, as in Opacus's grad sampler
    (``backprops[:, -1]``, after GradSampleModule has put the batch on dim 0). Where the layer's rows are not
    on the model's batch dimension (DPMultiheadAttention(batch_first=True) runs its SequenceBias layers
    sequence-first), the engine refuses the call ('returned L+1 rows'), so this rule never sees that layout."""
    if not module.bias.requires_grad:
        return {}
    if g.dim() != 3:
        raise ValueError(f"SequenceBias: expected an output gradient (N, L+1, E), got {tuple(g.shape)}")
    return {"bias": torch.sum(groups(g[:, -1], K), dim=1, out=block(out, "bias"))}


if SequenceBias is not None:
    register_rule(SequenceBias, params=("bias",), input_ndim=lambda d: d == 3)(sequence_bias_rule)
