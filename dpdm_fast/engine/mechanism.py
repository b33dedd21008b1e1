"""The mechanism's public numbers: the sample rate, the steps per epoch and the update's divisor.

Under add/remove neighbours the dataset's size is private. Every number here is computed from
public inputs only (the requested batch size, and the public dataset size when one is given), so
that nothing the run releases depends on the realised size beyond what the accountant assumes.
"""
from __future__ import annotations

# Accountants whose eps is an upper bound on the mechanism's, so they may calibrate the noise and decide
# when to stop. Opacus's 'gdp' is a central-limit approximation (it can be below the truth).
CALIBRATING_ACCOUNTANTS = ("rdp", "prv")


def batches_per_epoch(dataset_size: int, batch_size: int) -> int:
    """ceil(N / b): Opacus's number of steps per epoch, and 1 / q."""
    return -(-dataset_size // batch_size)


def normaliser(batch_size: int, public_size: int | None, sample_rate: float) -> float:
    """The divisor of a step's clipped, noised sum: the public expected batch size N_public q when the
    dataset size is public, else the requested batch size; never the realised N q (Opacus's divisor,
    which reveals N through the scale of the noise). An int where it is one (as Opacus's
    ``expected_batch_size``)."""
    value = round(public_size * sample_rate, 6) if public_size is not None else float(batch_size)
    return int(value) if value == int(value) else value
