"""The running sum of clipped per-example gradients, fed by the per-group rules during backward.

One ``GroupGradientCollector`` holds every DP setting that the clipping uses (K, the clip norm,
the loss reduction); the optimizer reads them from here, so the noise and the clipping can never
disagree.

At the end of each backward the buffer becomes a ``ClipJob`` (norms, clip factors) and is folded
into the step's running clipped sum at once, so that Opacus's ``p.summed_grad`` is that sum after
every backward; the step's final pass (``finish``) adds the noise and divides. (A fold that fails
keeps its job, folded at the next backward or the step.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..profiling import profile_scope
from .backends import ClipJob, Noise, get_backend
from .buffer import PerExampleBuffer, same_memory
from .opacus_views import OpacusViews
from .layout import FlatLayout


class GroupGradientCollector:
    """Turns per-group gradients into a running sum of clipped per-example gradients."""

    def __init__(self, layout: FlatLayout, noise_multiplicity: int, max_grad_norm: float,
                 loss_reduction: str, backend: str = "auto", grad_sample_views: bool = True):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
        self.layout, self.K, self.loss_reduction = layout, int(noise_multiplicity), loss_reduction
        self.backward_calls = 0        # backward passes folded in since the last reset
        self._max_grad_norm = 1.0
        self._layer_bounds: torch.Tensor | None = None   # per-layer clipping: one bound per parameter
        self._bounds: list[float] = []
        self.per_layer = isinstance(max_grad_norm, (list, tuple))
        self.max_grad_norm = max_grad_norm
        device = layout.params[0].device if layout.params else torch.device("cpu")
        self.backend = get_backend(backend, device)
        self._clipped_sum = torch.zeros(layout.size, dtype=torch.float32, device=device)
        self._pending: ClipJob | None = None  # the last backward's buffer, clipped but not yet summed
        self._stale = False            # clipped_sum holds a finished step's sum, to be zeroed before the next
        self.unclipped = 0             # examples flat clipping left unchanged since the last reset (a tensor)
        # p.grad_sample / p.summed_grad (views cost one scaling pass over the buffer per backward)
        self.views = OpacusViews(layout) if grad_sample_views else None
        self.num_examples = 0          # examples folded into clipped_sum since the last reset
        self.backwards_since_step = 0  # backward passes since the optimizer's last step() call
        self.last_norms: torch.Tensor | None = None  # per-example norms of the last backward
        # fp16 loss scaling (``DPOptimizer.attach_grad_scaler``): the scaler whose scale the loss was multiplied
        # by; each backward divides its per-example gradients by that scale before their norms are compared
        # with max_grad_norm. The scales used since the last reset, and the examples whose scaled gradient
        # overflowed (zeroed; a statistic of the private data: never log or save it).
        self.loss_scaler = None
        self.loss_scales: set[float] = set()
        # the public number of examples a 'mean' loss is divided by under loss scaling (None: each pass's own
        # count, which depends on the data, and so does which example overflows; see attach_grad_scaler)
        self.scaled_loss_divisor: int | None = None
        self.overflowed_examples: torch.Tensor | int = 0
        # ids of the trainable parameters of the current step (the user may freeze some between steps)
        self.active: frozenset = frozenset(id(p) for p in layout.params)
        self.closed = False
        self._buffer = PerExampleBuffer(layout)
        self._B: int | None = None                  # examples of the backward pass in progress
        self._task = -1
        self._rows = 0

    @property
    def max_grad_norm(self) -> float:
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        """Flat clipping: one bound. Per-layer clipping: a list, one bound per trainable parameter (layout
        order); ``max_grad_norm`` then reads their L2 norm, the sensitivity the noise is scaled to (Opacus)."""
        if isinstance(value, (list, tuple)) != self.per_layer:
            raise ValueError("per-layer clipping takes a list of bounds, one per trainable parameter, and flat "
                             f"clipping one number; got {value!r}")
        bounds = [float(v) for v in value] if self.per_layer else [float(value)]
        if any(not v > 0 or v == float("inf") for v in bounds):
            raise ValueError(f"max_grad_norm must be finite and > 0 (each bound, for per-layer clipping), got {value}")
        if self.per_layer and len(bounds) != len(self.layout.params):
            raise ValueError(f"per-layer clipping needs one bound per trainable parameter ({len(self.layout.params)}), "
                             f"got {len(bounds)}")
        total = float(torch.tensor(bounds, dtype=torch.float64).norm()) if self.per_layer else bounds[0]
        if (total != self._max_grad_norm or (self.per_layer and self._bounds != bounds)) and self.holds_examples:
            raise RuntimeError("max_grad_norm changed while clipped gradients of this step are accumulated "
                               "(between physical batches or backward passes of one step): change it only "
                               "after optimizer.step(), so every example of a step is clipped to the same norm")
        self._max_grad_norm, self._bounds = total, bounds
        if self.per_layer:
            device = self.layout.params[0].device if self.layout.params else None
            self._layer_bounds = torch.tensor(bounds, dtype=torch.float32, device=device)

    @property
    def max_grad_norms(self) -> list[float] | None:
        """Per-layer clipping's bounds, one per trainable parameter (None for flat clipping)."""
        return list(self._bounds) if self.per_layer else None

    @property
    def layout_device(self) -> torch.device:
        """Where the flat sums live (without folding anything in, unlike ``clipped_sum``)."""
        return self._clipped_sum.device

    @property
    def clipped_sum(self) -> torch.Tensor:
        """The flat fp32 sum of the clipped per-example gradients folded in since the last reset."""
        self.flush()
        return self._clipped_sum

    def flush(self) -> None:
        """Fold the last backward's buffer into ``clipped_sum``. The job is dropped only once folded in:
        a failed pass keeps it (and the step then fails too)."""
        if self._stale:   # the last step's sum (still readable as p.summed_grad until now)
            self._clipped_sum.zero_()
            self._stale = False
        if self._pending is not None:
            self.backend.reduce(self._pending, self._clipped_sum)
            self._pending = None

    def finish(self, noise: Noise) -> torch.Tensor:
        """The step's flat gradient (clipped sum + noise) / divisor; the clipped sum itself is left as is."""
        self.flush()
        return self.backend.reduce(None, self._clipped_sum, noise)

    @property
    def holds_examples(self) -> bool:
        return self.backward_calls > 0

    def set_active(self, active: frozenset, names: dict) -> None:
        """The trainable parameters of the next forward; they must not change within one step."""
        if active != self.active and self.holds_examples:
            changed = sorted(names[i] for i in active ^ self.active)
            raise RuntimeError(f"requires_grad of {changed[:5]} changed in the middle of a step (after a backward "
                               "whose clipped gradients are not yet applied): freeze or unfreeze parameters only "
                               "between optimizer.step() calls")
        self.active = active

    # -- during backward -------------------------------------------------------------------
    def begin(self, rows: int, device: torch.device) -> int:
        """Called by each layer's rule during backward: the number of examples B of this pass
        (the first call of a backward pass sets up the buffer for it). Row b of every forward this
        backward reaches belongs to example b's group (as Opacus sums per-sample gradients over a
        loss of several forwards, e.g. DCGAN's real and generated batches); the step's check of the
        clipped examples against the loader's batch refuses a batch split over several forwards."""
        task = torch._C._current_graph_task_id()
        if self._B is not None and task != self._task:
            self.abort()  # a previous backward died half-way: its partial sums must not leak into this one
        if self._B is None:
            if self.views is not None:
                self.views.check_unchanged()   # before the buffer that p.grad_sample views is overwritten
                self.views.invalidate()
            self.flush()  # the previous backward's clip-weighted sum, before its buffer is reused
            if self.closed:
                raise RuntimeError("this private module was replaced by a later make_private call: train the "
                                   "module (and optimizer) that call returned")
            if rows % self.K:
                raise ValueError(f"the loss covers {rows} rows, not a multiple of noise_multiplicity "
                                 f"K={self.K}: each example must contribute exactly K consecutive rows")
            B = rows // self.K
            if self._clipped_sum.device != device:
                raise RuntimeError(f"the model runs on {device} but the engine was set up on {self._clipped_sum.device}: "
                                   "move the model to its device before make_private (as with Opacus)")
            self._buffer.prepare(B, device)
            self._B, self._rows, self._task = B, rows, task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        elif rows != self._rows:
            raise RuntimeError(f"one backward pass saw layers with {self._rows} and {rows} rows: "
                               "call backward once per forward of the private module")
        return self._B

    def target(self, param: nn.Parameter) -> torch.Tensor:
        """The (B, *param.shape) block of the buffer where param's per-group gradients go; a rule
        that writes into it (``out=``) saves the copy ``write`` would otherwise make."""
        return self._buffer.blocks[id(param)]

    def squared_norm_row(self, param: nn.Parameter) -> torch.Tensor:
        """The (B,) fp32 row of the norm table (zero at this point) where a kernel rule adds each
        example's squared norm of param's gradient as it writes the ``target`` block."""
        return self._buffer.norm_rows[id(param)]

    def written(self, param: nn.Parameter) -> bool:
        """Whether param's block already holds gradients of this backward pass (an earlier use of it)."""
        return id(param) in self._buffer.written

    def written_by_kernel(self, param: nn.Parameter, name: str) -> None:
        """A kernel rule wrote param's block (its first use in this pass) and its squared norms: record
        it, take the square root."""
        if not self._buffer.mark_written(param):
            raise RuntimeError(f"a kernel rule overwrote the gradients of an earlier use of {name}")
        self._buffer.norm_rows[id(param)].sqrt_()

    def write(self, param: nn.Parameter, per_group: torch.Tensor, name: str, accumulated: bool = False) -> None:
        """Take param's per-group gradients (in its ``target`` block already, or copied there) and
        record each example's norm of them in the norm table while the block is still in cache.
        ``accumulated``: a later use's rule already added its gradients into the block."""
        expected = (self._B, *param.shape)
        if tuple(per_group.shape) != expected:
            raise RuntimeError(f"the per-group gradient of {name} has shape {tuple(per_group.shape)}, expected "
                               f"{expected} (examples, *parameter shape): the rule is wrong for this call")
        block = self._buffer.blocks[id(param)]
        if not self._buffer.mark_written(param):
            # another use of the parameter in this pass (tied weights, a layer run at several time steps): the
            # gradients add up; its norm is taken once all uses are in (``_end_of_backward``)
            if accumulated:
                if not same_memory(per_group, block):
                    raise RuntimeError(f"an accumulating rule of {name} did not add into its block")
                return
            if same_memory(per_group, block):
                raise RuntimeError(f"the rule of a later use of {name} overwrote the earlier uses' gradients")
            block.add_(per_group)
            return
        if not same_memory(per_group, block):
            with profile_scope("dpdm_fast.buffer_copy"):
                block.copy_(per_group)
        with profile_scope("dpdm_fast.norms"):
            self.backend.norms(block.view(self._B, param.numel()), out=self._buffer.norm_rows[id(param)])

    def _end_of_backward(self) -> None:
        B, self._B = self._B, None
        written = self._buffer.written
        if B is None:
            return
        for i in self._buffer.reused:   # parameters with several uses: the norm of the sum of their gradients
            p = self.layout.slots[i].param
            self.backend.norms(self._buffer.blocks[i].view(B, p.numel()), out=self._buffer.norm_rows[i])
        # Opacus's per-row scaling (rows for 'mean'), then the average over K rows. Parameters this
        # loss did not touch (or frozen ones) have zero gradient: they add nothing to norms or sums.
        scale = (self._rows if self.loss_reduction == "mean" else 1) / self.K
        if self.loss_scaler is not None:   # exact for GradScaler's powers of two
            if self.scaled_loss_divisor is not None:
                scale = float(self.scaled_loss_divisor)
            scale /= self._loss_scale()
        self._pending, overflowed = self._buffer.clip_job(
            B, written, scale, self.max_grad_norm, self.backend, self._layer_bounds,
            scale_in_place=self.views is not None, zero_nonfinite=self.loss_scaler is not None)
        self.overflowed_examples = self.overflowed_examples + overflowed
        self.last_norms = self._pending.norms
        self.unclipped = self.unclipped + self._pending.unclipped()
        self.num_examples += B
        self.backward_calls += 1
        self.backwards_since_step += 1
        # Folded in now (not at the step), so that p.summed_grad is the running clipped sum after every
        # backward, as in Opacus; the step's final pass only adds noise.
        self.flush()
        if self.views is not None:
            self.views.expose(self._buffer, B, written, self._clipped_sum)

    def _loss_scale(self) -> float:
        """The attached scaler's current scale: what this backward's loss was multiplied by."""
        loss_scale = float(self.loss_scaler.get_scale())
        if not 0 < loss_scale < float("inf"):
            raise RuntimeError(f"the GradScaler's scale is {loss_scale}: expected a finite positive scale")
        self.loss_scales.add(loss_scale)
        return loss_scale

    def abort(self) -> None:
        """Forget a backward pass that failed half-way (its clipped contributions were never added)."""
        self._B = None

    def reset(self) -> None:
        self._pending = None
        self._stale = True   # zeroed when the next backward folds in (p.summed_grad stays readable until then)
        self.num_examples = 0
        self.backward_calls = 0
        self.unclipped = 0
        self.loss_scales = set()
        self.overflowed_examples = 0
