"""The flat per-example buffer of one backward pass: a (B, numel) block per parameter, and the norm table."""
from __future__ import annotations

import torch

from ..profiling import profile_scope
from .backends import ClipJob
from .layout import FlatLayout


class PerExampleBuffer:
    """Storage for B examples' per-group gradients (see ``FlatLayout``) and a (params, B) table of their
    per-parameter norms. The storage grows to the largest B seen and is reused; the block and norm-row
    views are rebuilt only when B changes."""

    def __init__(self, layout: FlatLayout):
        self.layout = layout
        self.storage: torch.Tensor | None = None   # the flat per-example buffer
        self.blocks: dict = {}                      # id(param) -> its (B, *shape) block, for ``self.B`` examples
        self.B: int | None = None
        self.norm_table: torch.Tensor | None = None  # (params, B): per-parameter norms of each example
        self.norm_rows: dict = {}                   # id(param) -> its (B,) row of the norm table
        self.written: set[int] = set()              # id(param) of the blocks written in this pass
        self.reused: set[int] = set()               # of those, the ones written by several uses (tied weights)

    def prepare(self, B: int, device: torch.device) -> None:
        """Blocks and a zeroed norm table for a backward pass of B examples."""
        layout = self.layout
        self.written, self.reused = set(), set()
        with profile_scope("dpdm_fast.buffer_alloc"):
            if self.storage is None or self.storage.numel() < B * layout.size:
                self.storage, self.blocks, self.B = None, {}, None  # free it first: one buffer at peak
                self.storage = torch.empty(B * layout.size, dtype=torch.float32, device=device)
            if self.B != B:  # views of the blocks and norm rows, reused while B stays the same
                self.blocks = {id(p): layout.block(self.storage, p, B) for p in layout.params}
                self.norm_table = torch.empty(len(layout.params), B, dtype=torch.float32, device=device)
                self.norm_rows = {id(p): self.norm_table[i] for i, p in enumerate(layout.params)}
                self.B = B
            self.norm_table.zero_()  # parameters this pass does not write count as zero

    def mark_written(self, param) -> bool:
        """Record that param's block holds gradients of this pass; False if it already did (a second use)."""
        if id(param) in self.written:
            self.reused.add(id(param))
            return False
        self.written.add(id(param))
        return True

    def clip_job(self, B: int, written: set, scale: float, max_grad_norm: float, backend,
                 layer_bounds: torch.Tensor | None = None, scale_in_place: bool = True,
                 zero_nonfinite: bool = False) -> tuple[ClipJob, torch.Tensor | int]:
        """The pass's buffer as a job to clip and sum, and how many examples were zeroed. Each example's
        norm is the norm of its per-parameter norms; a non-finite one is refused, never clipped, unless
        ``zero_nonfinite`` (fp16 loss scaling, where an overflow is expected): that example's gradient is
        then replaced by zero. ``scale_in_place``: the blocks are first scaled to the per-example gradients
        (Opacus's ``grad_sample`` views them) and the job's scale is 1; otherwise the scale is applied with
        the clip factors (no pass over the buffer)."""
        self.norm_table.mul_(scale)
        if scale_in_place and scale != 1:
            with profile_scope("dpdm_fast.scale"):
                self.storage[:B * self.layout.size].mul_(scale)
        job_scale = 1.0 if scale_in_place else scale
        norms = backend.norms(self.norm_table.t())
        zeroed: torch.Tensor | int = 0
        if zero_nonfinite:
            zeroed = self._zero_nonfinite(B, norms)
        elif not torch.isfinite(norms).all():
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite per-example gradients for examples {bad[:10]} of this batch (their positions in the "
                "batch's examples, K rows each): NaN/Inf in the loss or the model. Refusing to clip them, since a "
                "NaN would poison the noisy sum and inf would be clipped to an arbitrary direction. To find the "
                "example, run the model without the engine on those rows and check torch.isfinite of the loss "
                "(or use torch.autograd.set_detect_anomaly(True)); private.collector.last_norms holds the norms")
        return ClipJob(self.layout, self.storage, B, [id(p) in written for p in self.layout.params], norms,
                       max_grad_norm, job_scale, layer_bounds, None if layer_bounds is None else self.norm_table), zeroed

    def _zero_nonfinite(self, B: int, norms: torch.Tensor) -> torch.Tensor:
        """Replace every example whose gradient holds an inf or NaN by a zero gradient (norms included).
        Each example's contribution stays a function of that example alone with norm <= max_grad_norm, so
        the sensitivity, and the guarantee, are unchanged; skipping the whole step instead would release,
        without noise, whether the batch held such an example. Returns the count (a tensor: no sync)."""
        bad = ~torch.isfinite(norms)
        with profile_scope("dpdm_fast.zero_nonfinite"):
            for p in self.layout.params:   # a fill, not a multiplication: inf * 0 is NaN
                self.layout.block(self.storage, p, B).view(B, p.numel()).masked_fill_(bad[:, None], 0.0)
            self.norm_table.masked_fill_(bad[None, :], 0.0)
            norms.masked_fill_(bad, 0.0)
        return bad.sum()


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    # (empty tensors share no memory: their data pointers can all be 0)
    return a.numel() > 0 and a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype
