"""The privacy side of a run, fixed before the first step: sample rate, steps, noise, budget.

A run may release other things of the same private data before DP-SGD (the warm-up's central images
and RFF embedding, ``dpdm_fast.warmup``): each is a (subsampled) Gaussian mechanism, a ``Release``
entry; the plan composes them with the DP-SGD steps in one accountant history, and DP-SGD's sigma is
calibrated so that the total meets the target.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import asdict, dataclass, field

import opacus
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from ..engine.mechanism import CALIBRATING_ACCOUNTANTS, batches_per_epoch, normaliser
from ..warmup.release import Release


def composed_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a whole history of (noise multiplier, sample rate, steps) entries, by a fresh Opacus
    accountant (RDP: orders composed; PRV: privacy loss distributions composed)."""
    history = [e for e in history if e[2] > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        # Opacus's RDPAccountant.get_privacy_spent, term for term, with each entry's RDP curve cached: the
        # calibration's bisection re-composes the same releases dozens of times (a warm-up release at
        # q=0.5 costs ~0.4 s per curve), and only the DP-SGD entry changes between its evaluations
        rdp = sum([_rdp_curve(sigma, q, steps) for sigma, q, steps in history])
        with quiet_accountant():
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with quiet_accountant():
        return acc.get_epsilon(delta=delta)


@functools.lru_cache(maxsize=1024)
def _rdp_curve(noise_multiplier: float, sample_rate: float, steps: int):
    """Opacus's RDP curve of one (sigma, q, steps) entry at its default orders (read-only: shared by the cache)."""
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                     orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


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
    releases: tuple[Release, ...] = field(default_factory=tuple)   # composed before the DP-SGD steps

    @property
    def expected_batch_size(self) -> float:
        return self.n_examples * self.sample_rate

    @property
    def divisor(self) -> float:
        """The update's normaliser, as the engine computes it from public numbers."""
        return normaliser(self.batch_size, self.n_examples if self.size_is_public else None, self.sample_rate)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon of every release and the first ``steps`` DP-SGD steps, composed."""
        return epsilon_after(self.accountant, self.noise_multiplier, self.sample_rate, steps, self.delta,
                             self.releases)

    def split(self) -> dict[str, float]:
        """Epsilon of each release alone, of the whole DP-SGD schedule alone, and of everything composed."""
        alone = {r.name: composed_epsilon(self.accountant, [r.entry], self.delta) for r in self.releases}
        alone["dp_sgd"] = epsilon_after(self.accountant, self.noise_multiplier, self.sample_rate, self.budget_steps,
                                        self.delta)
        alone["total"] = self.epsilon_after(self.budget_steps)
        return alone

    def describe_split(self) -> str:
        if not self.releases:
            return ""
        parts = self.split()
        stages = ", ".join(f"{r.name} (sigma={r.noise_multiplier:g}, q={r.sample_rate:g}, {r.steps} round(s)) "
                           f"eps={parts[r.name]:.3f} alone" for r in self.releases)
        return (f"privacy split at delta={self.delta:g}: {stages}; DP-SGD eps={parts['dp_sgd']:.3f} alone; "
                f"all composed ({self.accountant.upper()}): eps={parts['total']:.4f} of {self.target_epsilon:g}")

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


def epsilon_after(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  releases: tuple[Release, ...] = ()) -> float:
    """Epsilon of the ``releases`` and then ``steps`` Poisson-subsampled Gaussian steps, by a fresh Opacus
    accountant."""
    return composed_epsilon(accountant, [r.entry for r in releases] + [(noise_multiplier, sample_rate, steps)],
                            delta)


def calibrate_after(releases: tuple[Release, ...], *, epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str, tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (within ``tolerance`` of eps, as Opacus's search) for which the releases
    and ``steps`` DP-SGD steps composed stay within ``epsilon``: Opacus's bisection, on the whole history."""
    def eps(sigma: float) -> float:
        return epsilon_after(accountant, sigma, sample_rate, steps, delta, releases)

    if composed_epsilon(accountant, [r.entry for r in releases], delta) >= epsilon:
        raise ValueError("the releases before DP-SGD alone spend the whole budget")
    low, high = 0.0, 10.0
    while eps(high) > epsilon:
        low, high = high, 2 * high
        if high > 2 ** 20:
            raise ValueError("no noise multiplier below 2^20 reaches it")
    while epsilon - eps(high) > tolerance:
        mid = (low + high) / 2
        if eps(mid) < epsilon:
            high = mid
        else:
            low = mid
    return high


@contextlib.contextmanager
def quiet_accountant():
    """Opacus's RDP accountant warns when the best order is its largest alpha (the bound could be a bit
    tighter with more orders): the epsilon it returns is still a valid upper bound, so no warning per step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # the PRV accountant takes log(1 - q) of a release on the whole dataset (q = 1): -inf, which its
        # comparisons handle as intended
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        yield


def plan_privacy(*, n_examples: int, batch_size: int, n_epochs: int, epsilon: float, delta: float,
                 max_grad_norm: float, accountant: str, size_is_public: bool = False,
                 releases: tuple[Release, ...] = ()) -> PrivacyPlan:
    """Check the privacy target and calibrate sigma for it; every impossible target is a clear error.
    ``n_examples``: the public dataset size (``size_is_public=True``) or the realised one. ``releases``: what
    the run releases of the same data before DP-SGD, composed into the same budget."""
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
    releases = tuple(releases)
    try:
        if releases:
            sigma = calibrate_after(releases, epsilon=epsilon, delta=delta, sample_rate=q, steps=total,
                                    accountant=accountant)
        else:   # Opacus's own search (the sigma of every run without releases stays what it was)
            with quiet_accountant():
                sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=total,
                                             accountant=accountant)
    except ValueError as e:
        raise ValueError(f"no noise multiplier reaches eps={epsilon:g} at delta={delta:g} over {total} steps at "
                         f"q=1/{steps_per_epoch} ({accountant} accountant: {e}): raise dp.epsilon, or lower "
                         "train.n_epochs or train.batch_size") from None
    eps_total = epsilon_after(accountant, sigma, q, total, delta, releases)
    if eps_total <= epsilon:
        budget = total
    else:   # the search's tolerance overshot: keep only the steps that fit (largest n with eps(n) <= target)
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if epsilon_after(accountant, sigma, q, mid, delta, releases) <= epsilon:
                lo = mid
            else:
                hi = mid - 1
        budget = lo
    return PrivacyPlan(n_examples=n_examples, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                       total_steps=total, sample_rate=q, noise_multiplier=float(sigma), max_grad_norm=max_grad_norm,
                       target_epsilon=epsilon, delta=delta, accountant=accountant, budget_steps=budget,
                       size_is_public=size_is_public, releases=releases)
