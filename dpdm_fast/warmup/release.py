"""What the accountant sees of a release before DP-SGD: a (subsampled) Gaussian mechanism."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """One entry of the ledger before DP-SGD: ``steps`` rounds of a Gaussian mechanism with noise
    ``noise_multiplier`` times its L2 sensitivity, each on a Poisson sample of rate ``sample_rate``
    (1.0: the whole dataset). In Opacus's accountant history it is (noise_multiplier, sample_rate, steps)."""

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self):
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 1):
            raise ValueError(f"release {self.name!r}: needs noise_multiplier > 0, sample rate in (0, 1] and "
                             f">= 1 steps, got {self.noise_multiplier}, {self.sample_rate}, {self.steps}")

    @property
    def entry(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))
