"""DP optimizer: noise the clipped sum once per logical batch, then step the wrapped optimizer."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch.optim import Optimizer

from .private_module import GroupGradientCollector


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's cryptographic source (os.urandom)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


class DPOptimizer:
    """Wraps any torch optimizer; ``step()`` applies the DP-SGD update of the clipped sum.

    At each (logical) step: p.grad = (clipped_sum + N(0, (noise_multiplier * max_grad_norm)^2)) / d,
    with d the expected batch size (for ``loss_reduction='mean'``; 1 for ``'sum'``, as Opacus).
    ``before_noise`` hooks receive the flat fp32 clipped sum before noise is added; this is where a
    distributed run all-reduces it across ranks.
    """

    def __init__(self, optimizer: Optimizer, collector: GroupGradientCollector, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, loss_reduction: str = "mean",
                 generator: torch.Generator | None = None, secure_mode: bool = False):
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.original_optimizer = optimizer
        self.collector = collector
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.loss_reduction = expected_batch_size, loss_reduction
        self.secure_mode = secure_mode
        device = collector.clipped_sum.device
        if secure_mode:
            if generator is not None:
                raise ValueError("secure_mode draws noise from its own cryptographically seeded generator; "
                                 "do not pass noise_generator")
            generator = secure_generator(device)
        self.generator = generator
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self.before_noise: list[Callable[[torch.Tensor], None]] = []
        self.before_step_checks: list[Callable[[], None]] = []
        self._skip_next = False
        self._last_step_skipped = False
        self._steps_taken = 0
        layout = collector.layout
        ours = {id(p) for p in layout.params}
        theirs = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in theirs if p.requires_grad} - ours:
            raise ValueError("the optimizer holds parameters that are not trainable parameters of the private module")

    # -- Opacus-compatible surface ------------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

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
    def pre_step(self) -> bool:
        """Noise and scale; returns False when this step only accumulates."""
        if self.collector.backward_calls == 0:
            raise RuntimeError("optimizer.step() called without a backward() through the private module since "
                               "the last step: there are no clipped per-example gradients to apply")
        if self._skip_next:
            self._skip_next, self._last_step_skipped = False, True
            return False
        self._last_step_skipped = False
        for check in self.before_step_checks:
            check()
        total = self.collector.clipped_sum
        for hook in self.before_noise:
            hook(total)
        self.collector.backend.add_noise(total, self.noise_multiplier * self.max_grad_norm, self.generator,
                                         self.secure_mode)
        if self.secure_mode:  # re-seed so the stream cannot be replayed from one observed seed
            self.generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        if self.loss_reduction == "mean":
            total.div_(self.expected_batch_size)
        layout = self.collector.layout
        flat = total.clone()  # collector.reset() below zeroes `total`; the grads are views of this copy
        for p in layout.params:
            p.grad = layout.flat_view(flat, p).to(p.dtype)
        self.collector.reset()
        for hook in self.step_hooks:
            hook(self)
        self._steps_taken += 1
        return True

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier})"
