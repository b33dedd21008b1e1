"""DP optimizer: noise the clipped sum once per logical batch, then step the wrapped optimizer."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

import torch
from torch.optim import Optimizer

from .backends import Noise
from .collector import GroupGradientCollector, profile_scope
from .distributed import CHECK_EVERY, Replicas, ReplicaError, parameter_checksum


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's cryptographic source (os.urandom)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


class DPOptimizer(Optimizer):
    """Wraps any torch optimizer; ``step()`` applies the DP-SGD update of the clipped sum.

    At each (logical) step: p.grad = (clipped_sum + N(0, (noise_multiplier * max_grad_norm)^2)) / d,
    with d the expected batch size (for ``loss_reduction='mean'``; 1 for ``'sum'``, as Opacus), times
    the number of accumulated backward passes when ``scale_by_accumulated_iterations`` (Opacus's
    rule, used for ``poisson_sampling=False``). It is a ``torch.optim.Optimizer`` (as Opacus's is),
    so learning-rate schedulers work; ``param_groups`` / ``state`` are the wrapped optimizer's.

    ``max_grad_norm`` and ``loss_reduction`` are read from (and ``max_grad_norm`` written to) the
    private module's collector, so Opacus's clipping schedulers change clipping and noise together.
    ``noise_generator=None`` draws noise from torch's global RNG, as Opacus does (so
    ``torch.manual_seed`` fixes it); pass a ``torch.Generator`` for an isolated stream.
    ``before_noise`` hooks receive the flat fp32 clipped sum before noise is added (in a
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
        # No Optimizer.__init__: the wrapped optimizer owns the parameter groups and state.
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self.original_optimizer = optimizer
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
        self.secure_mode = secure_mode
        self.scale_by_accumulated_iterations = scale_by_accumulated_iterations
        if secure_mode:
            if generator is not None:
                raise ValueError("secure_mode draws noise from its own cryptographically seeded generator; "
                                 "do not pass noise_generator")
            generator = secure_generator(collector.clipped_sum.device)
        self.generator = generator
        if replicas is not None and scale_by_accumulated_iterations:
            raise ValueError("a distributed step needs Poisson sampling (one batch per step on every rank)")
        self.replicas = replicas
        self._exchanged = False
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self.before_noise: list[Callable[[torch.Tensor], None]] = []
        # The loader make_private returned (its ledger of batch sizes), and whether each step must be
        # exactly one of its batches (Poisson) or may accumulate several (Opacus's rule otherwise).
        self.ledger = None
        self.one_batch_per_step = True
        self.accumulated_iterations = 1
        self._skip_next = False
        self._last_step_skipped = False
        self._steps_taken = 0
        ours = set(collector.layout.slots)
        theirs = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in theirs if p.requires_grad} - ours:
            raise ValueError("the optimizer holds parameters that are not trainable parameters of the private module")

    # -- one source of truth ------------------------------------------------------------------
    @property
    def max_grad_norm(self) -> float:
        return self.collector.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self.collector.max_grad_norm = value   # clipping of the next examples and the noise of the next step

    @property
    def loss_reduction(self) -> str:
        return self.collector.loss_reduction

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        value = float(value)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {value}")
        self._noise_multiplier = value

    # -- Opacus-compatible surface ------------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults) -> None:
        self.original_optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        self.step_hooks.append(fn)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Next ``step()`` only accumulates (used by BatchMemoryManager for non-final physical batches)."""
        self._skip_next = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears p.grad; also drops accumulated clipped sums unless the last step was a skipped one."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if not self._last_step_skipped:
            self.collector.reset()

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    # -- the DP step ------------------------------------------------------------------------
    def _discard(self) -> None:
        """A refused step releases nothing: drop its clipped sums so the next correct step starts clean."""
        self.collector.reset()
        self._skip_next = self._last_step_skipped = False

    def pre_step(self) -> bool:
        """Noise and scale; returns False when this step only accumulates."""
        collector = self.collector
        accumulated, collector.backwards_since_step = collector.backwards_since_step, 0
        if self._skip_next and collector.backward_calls and not collector.closed:
            self._skip_next, self._last_step_skipped = False, True
            return False
        self._last_step_skipped = False
        refused, divisor = None, self.expected_batch_size
        # Everything that can fail on this rank alone happens before the ranks' exchange (so that a refusal is
        # announced to them there); the noise is drawn here too (rank 0), but released only by the all-reduce.
        try:
            if collector.closed:
                raise RuntimeError("this optimizer's private module was replaced by a later make_private call: use "
                                   "the optimizer that call returned")
            if collector.backward_calls == 0:
                raise RuntimeError("optimizer.step() called without a backward() through the private module since "
                                   "the last step: there are no clipped per-example gradients to apply")
            batches = self._check_batches() if self.ledger is not None else max(1, accumulated)
            self._check_no_ordinary_gradients()
            self.accumulated_iterations = batches
            divisor = 1
            if self.loss_reduction == "mean":
                divisor = self.expected_batch_size * (batches if self.scale_by_accumulated_iterations else 1)
            std = self.noise_multiplier * self.max_grad_norm
            if self.replicas is not None and not self.replicas.adds_noise:
                std = 0.0   # the noise is drawn once, by rank 0; the all-reduce below adds it to every rank's sum
            if self.before_noise:
                total = collector.clipped_sum   # (folds the last backward in first)
                for hook in self.before_noise:
                    hook(total)
            # the backend's final pass: the last backward's clip-weighted sum, noise, division, into one flat tensor
            flat = collector.finish(Noise(std, self.generator, self.secure_mode, divisor))
        except BaseException as e:
            self._discard()   # nothing half-applied: the step's clipped sums are dropped
            if self.replicas is None:
                raise
            refused = e       # raised below, after telling the other ranks (they must not wait for this one)
        if self.replicas is not None:
            try:
                self._agree_with_replicas(refused is None, divisor)
                if refused is None:
                    with profile_scope("dpdm_fast.all_reduce"):
                        self.replicas.all_reduce_sum(flat)
            except BaseException:
                self._discard()
                if refused is None:
                    raise
            if refused is not None:
                raise refused     # this rank's own reason (the others report that it refused)
        if self.secure_mode:  # re-seed so the stream cannot be replayed from one observed seed
            self.generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        layout = collector.layout
        with profile_scope("dpdm_fast.grads_out"):
            for p in layout.params:  # views of the flat tensor (no copy for fp32 parameters)
                p.grad = layout.flat_view(flat, p).to(p.dtype) if id(p) in collector.active else None
            collector.reset()
        for hook in self.step_hooks:
            hook(self)
        self._steps_taken += 1
        self._exchanged = False
        return True

    def abandon_step(self) -> None:
        """This rank cannot finish the current step (its forward or backward raised): drop the step's
        clipped sums and, in a distributed run, tell the other ranks at this step's exchange, so that
        they stop with an error instead of waiting for this one. Call it before re-raising."""
        self._discard()
        if self.replicas is not None and not self._exchanged:
            try:
                self._agree_with_replicas(False, self.expected_batch_size)
            except ReplicaError:
                pass

    def _agree_with_replicas(self, ok: bool, divisor: float) -> None:
        """Every rank enters this exchange once per step, also one that refused its step (``ok=False``),
        so that all stop together; settings changed on one rank only are refused on every rank."""
        self._exchanged = True     # (abandon_step must not enter it a second time for this step)
        values = {"ok": float(ok), "steps taken": self._steps_taken, "noise_multiplier": self.noise_multiplier,
                  "max_grad_norm": self.max_grad_norm, "divisor (expected batch size)": divisor,
                  "secure_mode": self.secure_mode, "noise multiplicity K": self.collector.K,
                  "parameter count": self.collector.layout.size,
                  "trained parameter count": sum(p.numel() for p in self.collector.layout.params
                                                 if id(p) in self.collector.active),
                  "parameter checksum": (parameter_checksum(self.collector.layout.params)
                                         if self._steps_taken % CHECK_EVERY == 0 else 0.0)}
        self.replicas.agree(values, self.collector.layout_device, f"step {self._steps_taken + 1}")

    def _check_batches(self) -> int:
        """Each step folds in exactly the examples of the batches drawn for it, each clipped once.
        Returns how many batches the step accumulated (1 under Poisson sampling)."""
        drawn = self.ledger.take_drawn()
        if not drawn:
            raise RuntimeError("optimizer.step() without a new batch from the data loader returned by make_private: "
                               "the accountant counts the batches of that loader (iterate it, not the original one)")
        if self.one_batch_per_step and len(drawn) > 1:
            raise RuntimeError(f"{len(drawn)} Poisson batches were drawn for one optimizer step: the accountant counts "
                               "one batch per step, and every batch drawn must be stepped (also an empty one: "
                               "skipping it changes the mechanism); step after each batch, or split one batch "
                               "into physical batches with dpdm_fast.BatchMemoryManager")
        clipped, size, K = self.collector.num_examples, sum(drawn), self.collector.K
        if clipped != size:
            hint = ""
            if size and clipped > size and clipped % size == 0:
                hint = (f" ({clipped // size} x the batch: a loss over {clipped // size} rows per example needs "
                        f"make_private(noise_multiplicity={clipped // size}) (it is {K}), or the batch went "
                        "through backward more than once)")
            raise RuntimeError(f"this step clipped {clipped} examples but its batch has {size}{hint}: every example "
                               "of the batch must be clipped exactly once per step, and the rows of every layer "
                               "must be the batch's rows (one backward per forward over the batch; physical batches "
                               "via BatchMemoryManager); the step was refused and its gradients discarded")
        return len(drawn)

    def _check_no_ordinary_gradients(self) -> None:
        ours = self.collector.layout.slots
        stray = [p for g in self.param_groups for p in g["params"] if id(p) not in ours and p.grad is not None]
        if stray:
            raise RuntimeError(f"{len(stray)} parameter(s) of the optimizer (shapes {[tuple(p.shape) for p in stray][:5]}) "
                               "are not trainable parameters of the private module but have a gradient: it would "
                               "be applied unclipped and un-noised; remove them from the optimizer or wrap a model "
                               "that owns them")

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        out = self.original_optimizer.step() if self.pre_step() else None
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return out

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier})"
