"""Where a DP step's noise comes from: a generator, or torch's global RNG, or the OS in secure mode."""
from __future__ import annotations

import os

import torch

from ..clipping import Noise


class NoiseSource:
    """``generator=None`` draws from torch's global RNG, as Opacus does (``torch.manual_seed`` fixes it).
    ``secure_mode``: a generator seeded from ``os.urandom`` and re-seeded from it after every step, so
    the stream cannot be replayed from one observed seed (no generator may be passed then)."""

    def __init__(self, generator: torch.Generator | None, secure_mode: bool, device: torch.device):
        if secure_mode:
            if generator is not None:
                raise ValueError("secure_mode draws noise from its own cryptographically seeded generator; "
                                 "do not pass noise_generator")
            generator = torch.Generator(device=device)
            generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        self.generator, self.secure_mode = generator, secure_mode

    def noise(self, std: float, divisor: float) -> Noise:
        """The final pass's noise: N(0, std^2) per coordinate, then the division by ``divisor``."""
        return Noise(std, self.generator, self.secure_mode, divisor)

    def after_step(self) -> None:
        if self.secure_mode:
            self.generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
