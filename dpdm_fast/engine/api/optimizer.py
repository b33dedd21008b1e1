"""DP optimizer: noise the clipped sum once per logical batch, then step the wrapped optimizer."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.optim import Optimizer

from ..clipping import GroupGradientCollector
from ..distributed import Replicas
from ..profiling import profile_scope
from .dp_settings import DPSettings
from .noise_source import NoiseSource
from .step_checks import check_batches, check_no_ordinary_gradients
from .wrapped_optimizer import WrappedOptimizer


class DPOptimizer(WrappedOptimizer, DPSettings):
    """Wraps any torch optimizer; ``step()`` applies the DP-SGD update of the clipped sum.

    At each (logical) step: p.grad = (clipped_sum + N(0, (noise_multiplier * max_grad_norm)^2)) / d,
    with d the expected batch size (for ``loss_reduction='mean'``; 1 for ``'sum'``, as Opacus), times
    the number of accumulated backward passes when ``scale_by_accumulated_iterations`` (Opacus's
    rule, used for ``poisson_sampling=False``). It is a ``torch.optim.Optimizer`` (as Opacus's is),
    so learning-rate schedulers work; ``param_groups`` / ``state`` are the wrapped optimizer's.

    ``max_grad_norm`` and ``loss_reduction`` are read from (and ``max_grad_norm`` written to) the
    private module's collector, so Opacus's clipping schedulers change clipping and noise together.
    Noise: see ``NoiseSource`` (``generator``, ``secure_mode``). ``before_noise`` hooks receive the flat fp32 clipped sum before noise is added (in a
    distributed run: this rank's share).

    ``replicas`` (a distributed run, see ``dpdm_fast.engine.distributed``): each step, the ranks first
    agree on the step and its settings, rank 0 alone adds the noise, and the flat gradient
    ``(clipped sum [+ noise]) / expected batch`` is summed over the ranks by one all-reduce, so
    every rank applies the same update: the one-process update of the union of their batches.
    """

    def __init__(self, optimizer: Optimizer, collector: GroupGradientCollector, *, noise_multiplier: float,
                 expected_batch_size: int, max_grad_norm: float | None = None, loss_reduction: str | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 scale_by_accumulated_iterations: bool = False, replicas: Replicas | None = None):
        super().__init__(optimizer)
        self.collector = collector
        if max_grad_norm is not None and float(max_grad_norm) != collector.max_grad_norm:
            raise ValueError(f"max_grad_norm={max_grad_norm} differs from the private module's clipping norm "
                             f"{collector.max_grad_norm}: one value must serve clipping and noise")
        if loss_reduction is not None and loss_reduction != collector.loss_reduction:
            raise ValueError(f"loss_reduction={loss_reduction!r} differs from the private module's "
                             f"{collector.loss_reduction!r}")
        self.noise_multiplier = noise_multiplier
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.expected_batch_size = expected_batch_size
        self.scale_by_accumulated_iterations = scale_by_accumulated_iterations
        self.noise_source = NoiseSource(generator, secure_mode, collector.layout_device)
        if replicas is not None and scale_by_accumulated_iterations:
            raise ValueError("a distributed step needs Poisson sampling (one batch per step on every rank)")
        self.replicas = replicas
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self.before_noise: list[Callable[[torch.Tensor], None]] = []
        # The loader make_private returned (its ledger of batch sizes), and whether each step must be
        # exactly one of its batches (Poisson) or may accumulate several (Opacus's rule otherwise).
        self.ledger = None
        self.one_batch_per_step = True
        self.accumulated_iterations = 1
        self._skip_next = self._last_step_skipped = False
        self._steps_taken = 0
        self.grad_scaler: torch.amp.GradScaler | None = None   # fp16 loss scaling (attach_grad_scaler)
        theirs = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in theirs if p.requires_grad} - set(collector.layout.slots):
            raise ValueError("the optimizer holds parameters that are not trainable parameters of the private module")

    # -- Opacus-compatible surface ------------------------------------------------------------
    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        self.step_hooks.append(fn)

    def attach_grad_scaler(self, scaler: "torch.amp.GradScaler", *, examples_per_pass: int | None = None) -> None:
        """fp16 autocast with loss scaling: train with ``scaler.scale(loss).backward()``,
        ``scaler.step(optimizer)``, ``scaler.update()`` as usual, after attaching the scaler here.

        ``examples_per_pass`` (required with loss_reduction 'mean'): a public number P, typically the largest
        physical batch; the loss of every backward is then ``per_example_losses.sum() / P`` (not the mean
        over the pass), so each example's scaled fp16 gradient is its gradient times scale / P whatever the
        pass's size. With the plain mean it is scaled by scale / n, n the examples of its pass: n follows the
        Poisson batch's size, a function of the data, and so would whether an example overflows (and is
        zeroed, below), which a record's presence could then change for the others: refused.

        Each backward divides its per-example gradients by the scaler's scale before their norms are
        taken, so they are clipped at max_grad_norm unscaled, and the noise is added at the unscaled
        scale, as in fp32. No step is ever skipped: skipping one because an example's scaled gradient
        overflowed would release, without noise, whether the batch held such an example. That example's
        gradient is replaced by zero instead (still a function of the example alone, of norm <= max_grad_norm,
        so the step is an ordinary, counted DP-SGD step), and the scaler is told that no step overflowed,
        so its scale never depends on the private data: it stays fixed (a growing scaler is refused: its
        growth counts update() calls, whose number depends on the data). Use a fixed scale
        (``GradScaler(init_scale=2.0**16, growth_interval=10**9)``) small enough for the network;
        ``collector.overflowed_examples`` counts the zeroed examples of a step (a statistic of the private
        data: for debugging, never to be logged or released)."""
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"expected a torch.amp.GradScaler, got {type(scaler).__name__}")
        if self.collector.holds_examples:
            raise RuntimeError("attach the GradScaler between steps, not after a backward of the current step")
        if examples_per_pass is not None:
            if self.loss_reduction != "mean":
                raise ValueError("examples_per_pass divides a 'mean' loss; with loss_reduction 'sum' each example's "
                                 "scaled gradient is already its gradient times the scale")
            if isinstance(examples_per_pass, bool) or not isinstance(examples_per_pass, int) or examples_per_pass < 1:
                raise ValueError(f"examples_per_pass must be a positive integer, got {examples_per_pass!r}")
        elif self.loss_reduction == "mean" and scaler.is_enabled():
            raise ValueError("attach_grad_scaler needs examples_per_pass with loss_reduction 'mean': with the mean "
                             "over each pass, whether an example's fp16 gradient overflows (and is zeroed) depends "
                             "on how many examples share its pass, which depends on the data. Pass "
                             "examples_per_pass=P (public, e.g. the largest physical batch) and backpropagate "
                             "scaler.scale(per_example_losses.sum() / P)")
        if scaler.is_enabled() and scaler.get_growth_factor() != 1 and scaler.get_growth_interval() < 10**9:
            # growth counts update() calls, one per physical batch in the usual loop: their number follows the
            # Poisson batches' sizes, so the scale, and which examples overflow, would depend on the data
            raise ValueError(f"this GradScaler grows its scale by {scaler.get_growth_factor()} every "
                             f"{scaler.get_growth_interval()} update() calls, whose number depends on the data "
                             "(one per physical batch): use a fixed scale, "
                             "GradScaler(init_scale=..., growth_interval=10**9)")
        if scaler.is_enabled() and examples_per_pass is not None and scaler.get_scale() < examples_per_pass:
            # measured (bench/fp16_underflow.py, the published MNIST network, K=32, CPU): the update's error
            # against fp32 is 3.7e-4 for scale / P >= 8, 2.0e-3 at 1 and 3.5e-2 at 1/16, where 1.9% of it is 0
            warnings.warn(f"fp16 loss scale {scaler.get_scale():g} / examples_per_pass {examples_per_pass} < 1: "
                          "each example's fp16 gradients are scaled down and small ones underflow to zero; use "
                          f"a scale of at least {8 * examples_per_pass} (8 x examples_per_pass)", stacklevel=2)
        self.grad_scaler = self.collector.loss_scaler = scaler
        self.collector.scaled_loss_divisor = examples_per_pass

    def check_loss_scale(self, grad_scale) -> None:
        """A GradScaler steps this optimizer: the step's gradients must have been unscaled by its scale."""
        used = self.collector.loss_scales
        if self.grad_scaler is None or (used and used != {float(grad_scale)}):
            del self.grad_scale, self.found_inf     # (GradScaler deletes them only after a step that returns)
            self._discard()
            if self.grad_scaler is None:
                raise RuntimeError(
                    "a GradScaler steps this optimizer, but it was not attached: the per-example gradients carry "
                    "the loss scale, so clipping them at max_grad_norm would clip the true gradients at "
                    "max_grad_norm / scale. Call optimizer.attach_grad_scaler(scaler) before the first backward "
                    "(or train in fp32 or with bf16 autocast, which needs no loss scaling)")
            raise RuntimeError(f"the step's gradients were unscaled by {sorted(used)}, but the GradScaler stepping "
                               f"it has scale {float(grad_scale)}: step with the scaler attached to this optimizer")

    def _report_no_overflow(self) -> None:
        """GradScaler.update() backs off on the overflows recorded for each optimizer; record none (see
        ``attach_grad_scaler``), so that its scale never depends on the private data."""
        state = self.grad_scaler._per_optimizer_states[id(self)]
        device = self.collector.layout_device
        state["found_inf_per_device"] = {device: torch.zeros((), dtype=torch.float32, device=device)}

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Next ``step()`` only accumulates (used by BatchMemoryManager for non-final physical batches)."""
        self._skip_next = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears p.grad; also drops accumulated clipped sums unless the last step was a skipped one."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if self.collector.views is not None:
            self.collector.views.clear(summed_grad=not self._last_step_skipped)
        if not self._last_step_skipped:
            self.collector.reset()

    # -- the DP step ------------------------------------------------------------------------
    def _discard(self) -> None:
        """A refused step releases nothing: drop its clipped sums so the next correct step starts clean."""
        self.collector.reset()
        self._skip_next = self._last_step_skipped = False

    def _settings(self, divisor: float) -> dict:
        """What the ranks must agree on at each step (besides what the collector knows)."""
        return {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "divisor (expected batch size)": divisor, "secure_mode": self.secure_mode}

    def pre_step(self) -> bool:
        """Noise and scale; returns False when this step only accumulates."""
        collector = self.collector
        if self.grad_scaler is not None:
            self._report_no_overflow()
        accumulated, collector.backwards_since_step = collector.backwards_since_step, 0
        if self._skip_next and collector.backward_calls and not collector.closed:
            self._skip_next, self._last_step_skipped = False, True
            return False
        self._last_step_skipped = False
        flat, divisor, refused = None, self.expected_batch_size, None
        # Everything that can fail on this rank alone happens before the ranks' exchange (so that a refusal is
        # announced to them there); the noise is drawn here too (rank 0), but released only by the all-reduce.
        try:
            flat, divisor = self._noised_sum(accumulated)
        except BaseException as e:
            self._discard()   # nothing half-applied: the step's clipped sums are dropped
            if self.exchange is None:
                raise
            refused = e       # raised by settle(), after telling the other ranks (they must not wait for this one)
        if self.exchange is not None:
            self.exchange.settle(flat, refused, self._steps_taken, self._settings(divisor), self._discard)
        self.noise_source.after_step()
        layout = collector.layout
        with profile_scope("dpdm_fast.grads_out"):
            for p in layout.params:  # views of the flat tensor (no copy for fp32 parameters)
                p.grad = layout.flat_view(flat, p).to(p.dtype) if id(p) in collector.active else None
            collector.reset()
        self._after_reset()
        for hook in self.step_hooks:
            hook(self)
        self._steps_taken += 1
        if self.exchange is not None:
            self.exchange.new_step()
        return True

    def _noised_sum(self, accumulated: int) -> tuple[torch.Tensor, float]:
        """This rank's checks, then the backend's final pass: (clipped sum + noise) / divisor, one flat tensor."""
        collector = self.collector
        if collector.closed:
            raise RuntimeError("this optimizer's private module was replaced by a later make_private call: use "
                               "the optimizer that call returned")
        if collector.backward_calls == 0:
            raise RuntimeError("optimizer.step() called without a backward() through the private module since "
                               "the last step: there are no clipped per-example gradients to apply")
        batches = (check_batches(self.ledger, collector, self.one_batch_per_step) if self.ledger is not None
                   else max(1, accumulated))
        check_no_ordinary_gradients(self.param_groups, collector.layout)
        if collector.views is not None:
            collector.views.check_unchanged()
        self.accumulated_iterations = batches
        divisor = 1
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * (batches if self.scale_by_accumulated_iterations else 1)
        std = self._gradient_noise_multiplier() * self.max_grad_norm
        if self.exchange is not None and not self.exchange.adds_noise:
            std = 0.0   # the noise is drawn once, by rank 0; the all-reduce adds it to every rank's sum
        if self.before_noise:
            total = collector.clipped_sum   # (folds the last backward in first)
            for hook in self.before_noise:
                hook(total)
        flat = collector.finish(self.noise_source.noise(std, divisor))
        self._other_releases(batches)
        return flat, divisor

    # -- what a subclass with another mechanism changes (AdaClipDPOptimizer) -----------------------
    def _gradient_noise_multiplier(self) -> float:
        """The gradient's noise std in units of max_grad_norm (the accountant is told ``noise_multiplier``)."""
        return self.noise_multiplier

    def _other_releases(self, batches: int) -> None:
        """Noised statistics besides the gradient, drawn in the step (before the clipped sums are reset)."""

    def _after_reset(self) -> None:
        """Settings derived from this step's releases, applied once its clipped sums are reset."""

    def abandon_step(self) -> None:
        """This rank cannot finish the current step (its forward or backward raised): drop the step's
        clipped sums and, in a distributed run, tell the other ranks at this step's exchange, so that
        they stop with an error instead of waiting for this one. Call it before re-raising."""
        self._discard()
        if self.exchange is not None:
            self.exchange.abandon(self._steps_taken, self._settings(self.expected_batch_size))

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier})"
