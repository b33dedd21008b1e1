"""The accounting side of ``PrivacyEngine``: Opacus's accountant, its ledger and what it reports."""
from __future__ import annotations

import opacus
from opacus.accountants import create_accountant


class Accounting:
    """An Opacus accountant ('rdp', 'prv', 'gdp') and the ledger of the steps taken; ``state_dict`` /
    ``load_state_dict`` carry the ledger across a resume."""

    def __init__(self, accountant: str):
        self.accountant = create_accountant(mechanism=accountant)
        # releases before the first step (not steps of this engine); kept apart as well, because Opacus merges a
        # step into the last ledger entry when their (sigma, q) are equal
        self.prior: list[tuple[float, float, int]] = []

    def compose_releases(self, entries: list[tuple[float, float, int]]) -> None:
        """Put earlier releases of the same data (each (noise multiplier, sample rate, rounds) of a Gaussian
        mechanism, e.g. a warm-up's) at the head of the ledger, so that ``get_epsilon`` composes them with
        the steps. Only before the first step; ``steps`` still counts this engine's steps alone."""
        if getattr(self.accountant, "history", None) or self.prior:
            raise RuntimeError("compose_releases: the ledger already holds steps or releases; releases come first, once")
        self.prior = [(float(s), float(q), int(n)) for s, q, n in entries]
        self.accountant.history = list(self.prior)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, from the Opacus accountant."""
        return self.accountant.get_epsilon(delta=delta)

    def privacy_report(self, delta: float) -> str:
        """One line naming the epsilon and which accountant produced it."""
        return (f"eps={self.get_epsilon(delta):.4f} at delta={delta:g} after {self.steps} steps "
                f"({self.accountant.mechanism()} accountant, Opacus {opacus.__version__})")

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in getattr(self.accountant, "history", [])) - sum(n for _, _, n in self.prior)

    def state_dict(self) -> dict:
        """Accountant ledger (and what produced it), to save in a checkpoint."""
        return {"mechanism": self.accountant.mechanism(), "accountant": self.accountant.state_dict(),
                "secure_mode": self.secure_mode, "prior_releases": list(self.prior)}

    def load_state_dict(self, state: dict) -> None:
        """Resume the ledger of a saved run: later steps add to it."""
        if state["mechanism"] != self.accountant.mechanism():
            raise ValueError(f"checkpoint was accounted with {state['mechanism']!r}, this engine uses "
                             f"{self.accountant.mechanism()!r}: create PrivacyEngine(accountant="
                             f"{state['mechanism']!r}) to resume the same ledger")
        self.accountant.load_state_dict(state["accountant"])
        self.prior = [tuple(e) for e in state.get("prior_releases", [])]
