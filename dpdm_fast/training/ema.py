"""Exponential moving average of the weights, as DPDM keeps it (score_sde's EMA with its warm-up)."""
from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """Shadow copies of a network's parameters (and buffers), updated after every optimizer step.

    The decay after n updates is min(rate, (1 + n) / (10 + n)), score_sde's warm-up, which DPDM
    inherits: early in training the average follows the weights closely instead of holding on to
    the random initialisation. The EMA is post-processing of the private weights: it costs no privacy.
    """

    def __init__(self, network: nn.Module, rate: float):
        if not 0 <= rate < 1:
            raise ValueError(f"model.ema_rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.num_updates = 0
        self.shadow = {name: t.detach().clone() for name, t in network.state_dict().items()}

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.rate, (1 + self.num_updates) / (10 + self.num_updates))
        for name, t in network.state_dict().items():
            shadow = self.shadow[name]
            if t.dtype.is_floating_point:
                shadow.lerp_(t.detach(), 1 - decay)
            else:
                shadow.copy_(t)

    def state_dict(self) -> dict:
        """The averaged network's state_dict (the network's own keys)."""
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict, num_updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not fit the network: keys {sorted(missing)[:5]} differ")
        for name, t in state.items():
            self.shadow[name].copy_(t)
        self.num_updates = num_updates
