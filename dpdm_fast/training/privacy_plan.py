"""The privacy side of a run, fixed before the first step: sample rate, steps, noise, budget."""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass

import opacus
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from ..engine.mechanism import CALIBRATING_ACCOUNTANTS, batches_per_epoch, normaliser


@dataclass(frozen=True)
class PrivacyPlan:
    """What the accountant is told and what it promises.

    ``sample_rate`` is the Poisson rate the engine's loader uses (1 / batches per epoch, as Opacus);
    ``noise_multiplier`` is calibrated so that ``total_steps`` steps at that rate spend at most
    ``target_epsilon`` at ``delta``; ``budget_steps`` is the last step count within the target (the
    run never takes a step beyond it, even if the schedule were longer).

    ``n_examples`` is the public dataset size (``data.public_size``) when ``size_is_public``; else it
    is the realised size of the private dataset, then treated as public (as Opacus does): under
    add/remove neighbours that reveals it, through q and the number of steps. ``divisor`` is what the
    clipped, noised sum is divided by: the public expected batch size (N_public q), or the configured
    batch size when no public size is given; never the realised N q.
    """

    n_examples: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    delta: float
    accountant: str
    budget_steps: int
    size_is_public: bool = False

    @property
    def expected_batch_size(self) -> float:
        return self.n_examples * self.sample_rate

    @property
    def divisor(self) -> float:
        """The update's normaliser, as the engine computes it from public numbers."""
        return normaliser(self.batch_size, self.n_examples if self.size_is_public else None, self.sample_rate)

    def epsilon_after(self, steps: int) -> float:
        return epsilon_after(self.accountant, self.noise_multiplier, self.sample_rate, steps, self.delta)

    def describe(self) -> str:
        size = (f"N={self.n_examples}, public (data.public_size)" if self.size_is_public else
                f"N={self.n_examples}, the realised size of the training set, TREATED AS PUBLIC: q and the number "
                "of steps reveal it; set data.public_size to fix them from a public number")
        return (f"DP target eps={self.target_epsilon:g} at delta={self.delta:g}: Poisson sampling at q=1/{self.steps_per_epoch} "
                f"(expected batch {self.expected_batch_size:.1f} of {size}), {self.total_steps} steps "
                f"({self.total_steps // self.steps_per_epoch} epochs), update divided by {self.divisor:g}, clip "
                f"C={self.max_grad_norm:g}, noise multiplier sigma={self.noise_multiplier:.4f} from Opacus "
                f"{opacus.__version__}'s {self.accountant.upper()} accountant")

    def as_dict(self) -> dict:
        return asdict(self)


def epsilon_after(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps, by a fresh Opacus accountant."""
    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with quiet_accountant():
        return acc.get_epsilon(delta=delta)


@contextlib.contextmanager
def quiet_accountant():
    """Opacus's RDP accountant warns when the best order is its largest alpha (the bound could be a bit
    tighter with more orders): the epsilon it returns is still a valid upper bound, so no warning per step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def plan_privacy(*, n_examples: int, batch_size: int, n_epochs: int, epsilon: float, delta: float,
                 max_grad_norm: float, accountant: str, size_is_public: bool = False) -> PrivacyPlan:
    """Check the privacy target and calibrate sigma for it; every impossible target is a clear error.
    ``n_examples``: the public dataset size (``size_is_public=True``) or the realised one."""
    if n_examples < 1:
        raise ValueError("data.public_size must be >= 1" if size_is_public else "the training set is empty")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"dp.epsilon must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1 / n_examples:
        raise ValueError(f"dp.delta must be in (0, 1/N) = (0, {1 / n_examples:.3g}) for N={n_examples} training "
                         f"examples, got {delta}: a delta of 1/N or more allows releasing an example outright")
    if not max_grad_norm > 0:
        raise ValueError(f"dp.max_grad_norm must be > 0, got {max_grad_norm}")
    if batch_size < 1 or n_epochs < 1:
        raise ValueError(f"train.batch_size and train.n_epochs must be >= 1, got {batch_size}, {n_epochs}")
    if accountant == "gdp":
        raise ValueError("dp.accountant=gdp: Opacus's GDP accountant is a central-limit approximation whose eps is "
                         "not an upper bound (it can be below the true eps of the mechanism), so it cannot calibrate "
                         "the noise or decide when to stop: use dp.accountant=rdp or prv")
    if accountant not in CALIBRATING_ACCOUNTANTS:
        raise ValueError(f"dp.accountant must be rdp or prv, got {accountant!r}")
    steps_per_epoch = batches_per_epoch(n_examples, batch_size)
    total = steps_per_epoch * n_epochs
    q = 1 / steps_per_epoch
    try:
        with quiet_accountant():
            sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=total,
                                         accountant=accountant)
    except ValueError as e:
        raise ValueError(f"no noise multiplier reaches eps={epsilon:g} at delta={delta:g} over {total} steps at "
                         f"q=1/{steps_per_epoch} ({accountant} accountant: {e}): raise dp.epsilon, or lower "
                         "train.n_epochs or train.batch_size") from None
    eps_total = epsilon_after(accountant, sigma, q, total, delta)
    if eps_total <= epsilon:
        budget = total
    else:   # the search's tolerance overshot: keep only the steps that fit (largest n with eps(n) <= target)
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if epsilon_after(accountant, sigma, q, mid, delta) <= epsilon:
                lo = mid
            else:
                hi = mid - 1
        budget = lo
    return PrivacyPlan(n_examples=n_examples, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                       total_steps=total, sample_rate=q, noise_multiplier=float(sigma), max_grad_norm=max_grad_norm,
                       target_epsilon=epsilon, delta=delta, accountant=accountant, budget_steps=budget,
                       size_is_public=size_is_public)
