"""Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021),
with Opacus's ``AdaClipDPOptimizer`` arguments.

Each step also releases how many of its examples were not clipped, noised, and moves the clip bound
geometrically towards the ``target_unclipped_quantile`` of the per-example norms:
``C <- clamp(C * exp(-lr * (unclipped_fraction - target)), min_clipbound, max_clipbound)``.

Accounting (Theorem 1 of the paper, as Opacus): the step is the Gaussian mechanism with the
``noise_multiplier`` sigma the accountant is told when the gradient is noised with
``sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` and the count with ``sigma_b = unclipped_num_std``.
That holds when the count's sensitivity is 1/2, which is why the released count is centred, as in the
paper: sum_i (1[example i unclipped] - 1/2), to which adding or removing one example adds +-1/2.

Two differences from Opacus 1.6, both because its version releases more than its accounting covers:
it noises the raw count (sensitivity 1, so the accountant's (2 sigma_b)^-2 term undercounts it by 4x) and
divides by the realised number of examples (a private quantity, released through the new bound). Here the
centred count is noised, and the fraction is ``noisy / expected batch size + 1/2`` with the same public
expected batch size the gradient is divided by.
"""
from __future__ import annotations

import math

import torch

from .optimizer import DPOptimizer


class AdaClipDPOptimizer(DPOptimizer):
    """``DPOptimizer`` whose clip bound follows a noised quantile of the per-example norms."""

    def __init__(self, optimizer, collector, *, noise_multiplier: float, target_unclipped_quantile: float,
                 clipbound_learning_rate: float, max_clipbound: float, min_clipbound: float,
                 unclipped_num_std: float, **kwargs):
        super().__init__(optimizer, collector, noise_multiplier=noise_multiplier, **kwargs)
        if collector.per_layer:
            raise ValueError("adaptive clipping adapts one flat clip bound: pass max_grad_norm as a number")
        if not 0 <= target_unclipped_quantile <= 1:
            raise ValueError(f"target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile}")
        if not max_clipbound > min_clipbound > 0:
            raise ValueError("max_clipbound must be larger than min_clipbound, and min_clipbound > 0")
        if not unclipped_num_std > 0:
            raise ValueError(f"unclipped_num_std must be > 0 (the count is released with that noise), got "
                             f"{unclipped_num_std}")
        if self.replicas is not None:
            raise NotImplementedError("adaptive clipping in a distributed run: the unclipped count would have to "
                                      "be all-reduced and noised once; use flat clipping")
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clipbound_learning_rate = float(clipbound_learning_rate)
        self.max_clipbound, self.min_clipbound = float(max_clipbound), float(min_clipbound)
        self.unclipped_num_std = float(unclipped_num_std)
        self.unclipped_num: float | None = None   # the last step's released (noised, centred) count
        self._next_bound: float | None = None
        self._gradient_noise_multiplier()   # (checks sigma < 2 sigma_b)

    def _gradient_noise_multiplier(self) -> float:
        sigma = self.noise_multiplier
        if sigma >= 2 * self.unclipped_num_std:   # (checked at every step: a scheduler may change sigma)
            raise ValueError("noise_multiplier must be smaller than 2 * unclipped_num_std (Theorem 1 of Andrew et "
                             "al. 2021): the gradient's noise is what is left of the budget after the count's")
        return 0.0 if sigma == 0 else (sigma ** -2 - (2 * self.unclipped_num_std) ** -2) ** -0.5

    def _other_releases(self, batches: int) -> None:
        collector = self.collector
        centred = float(collector.unclipped) - collector.num_examples / 2
        count = torch.tensor([centred], dtype=torch.float32, device=collector.layout_device)
        # the gradient noise's sampler (in secure mode with its floating-point-attack defence)
        collector.backend.add_noise(count, self.unclipped_num_std, self.generator, self.secure_mode)
        self.unclipped_num = count.item()
        expected = self.expected_batch_size * (batches if self.scale_by_accumulated_iterations else 1)
        fraction = self.unclipped_num / expected + 0.5
        bound = self.max_grad_norm * math.exp(-self.clipbound_learning_rate
                                              * (fraction - self.target_unclipped_quantile))
        self._next_bound = min(self.max_clipbound, max(self.min_clipbound, bound))

    def _after_reset(self) -> None:
        if self._next_bound is not None:
            self.max_grad_norm, self._next_bound = self._next_bound, None

    def __repr__(self) -> str:
        return (f"AdaClipDPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm})")
