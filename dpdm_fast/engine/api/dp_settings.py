"""The settings a DP step reads, each with one source of truth."""
from __future__ import annotations

import torch

from ..distributed import Replicas, StepExchange


class DPSettings:
    """The DP optimizer's settings: ``max_grad_norm`` and ``loss_reduction`` are the private module's
    collector's (so Opacus's clipping schedulers change clipping and noise together), the noise
    multiplier is checked when set, the noise's generator and secure mode are its ``noise_source``'s,
    and ``replicas`` (a distributed run) makes the step's ``exchange``."""

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

    @property
    def secure_mode(self) -> bool:
        return self.noise_source.secure_mode

    @property
    def generator(self) -> torch.Generator | None:
        return self.noise_source.generator

    @property
    def replicas(self) -> Replicas | None:
        return None if self.exchange is None else self.exchange.replicas

    @replicas.setter
    def replicas(self, replicas: Replicas | None) -> None:
        self.exchange = None if replicas is None else StepExchange(replicas, self.collector)
