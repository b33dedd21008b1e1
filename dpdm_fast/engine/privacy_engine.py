"""``PrivacyEngine``: a drop-in for ``opacus.PrivacyEngine`` with noise multiplicity."""
from __future__ import annotations

import warnings
from typing import Any

import opacus
import torch
import torch.nn as nn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .optimizer import DPOptimizer, secure_generator
from .private_module import PrivateModule
from .poisson import PoissonDataLoader, make_poisson_loader


class PrivacyEngine:
    """DP-SGD with per-example clipping of groups of K rows (DPDM's noise multiplicity).

    Same constructor and ``make_private`` / ``make_private_with_epsilon`` / ``get_epsilon`` as
    Opacus; accounting is Opacus's own accountants ('rdp', 'prv', 'gdp').

    ``secure_mode=False`` (default): noise from ``noise_generator`` if given, else from a
    ``torch.Generator`` seeded from torch's global RNG at ``make_private`` (reproducible under
    ``torch.manual_seed``). ``secure_mode=True``: noise from a generator seeded from
    ``os.urandom`` and re-seeded from it after every step, Poisson sampling likewise, and Opacus's
    floating-point-attack defence (sum of 4 draws / 2). The stream is then unpredictable from any
    seed in code or config; torch's generators are not themselves cryptographic PRNGs.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.module: PrivateModule | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: PoissonDataLoader | None = None
        self.sample_rate: float | None = None
        if not secure_mode:
            warnings.warn("Secure RNG turned off: fine for experiments; use secure_mode=True for real releases.",
                          stacklevel=2)

    # -- wrapping ---------------------------------------------------------------------------
    def make_private(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm: float, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, noise_generator: torch.Generator | None = None,
                     noise_multiplicity: int = 1, backend: str = "auto", strict: bool = False,
                     clipping: str = "flat", batch_first: bool = True, grad_sample_mode: str | None = None,
                     criterion: Any = None, **kwargs):
        """Returns (private module, DP optimizer, data loader), like Opacus.

        After ``loss.backward()`` on the mean (or sum) loss over B*K group-major rows, ``step()``
        applies: per example, the average of its K per-row gradients (Opacus-scaled for the loss
        reduction), clipped to ``max_grad_norm`` over all parameters, summed, plus
        N(0, (noise_multiplier * max_grad_norm)^2) per coordinate, divided by the expected batch
        size (for 'mean'), then the wrapped optimizer's step.
        """
        if kwargs:
            raise TypeError(f"make_private got unsupported arguments {sorted(kwargs)}")
        if clipping != "flat":
            raise NotImplementedError(f"clipping={clipping!r}: only flat (all-parameter) clipping is implemented")
        if not batch_first:
            raise NotImplementedError("batch_first=False is not supported: rows must be on dim 0")
        if grad_sample_mode not in (None, "hooks"):
            warnings.warn(f"grad_sample_mode={grad_sample_mode!r} is ignored: dpdm_fast always computes "
                          "per-group gradients with its own rules", stacklevel=2)
        if noise_generator is not None and self.secure_mode:
            raise ValueError("passing noise_generator is prohibited in secure mode")
        model_params = {id(p) for p in module.parameters()}
        if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("module parameters are different from the optimizer's parameters")

        private = module if isinstance(module, PrivateModule) else PrivateModule(
            module, noise_multiplicity=noise_multiplicity, max_grad_norm=max_grad_norm,
            loss_reduction=loss_reduction, backend=backend, strict=strict)

        if poisson_sampling:
            sampler_rng = secure_generator() if self.secure_mode else None
            data_loader = make_poisson_loader(data_loader, generator=sampler_rng)
        else:
            warnings.warn("poisson_sampling=False: the accountant's guarantee assumes Poisson sampling and "
                          "does not strictly hold for shuffled fixed-size batches", stacklevel=2)
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)

        if noise_generator is None and not self.secure_mode:
            # A seeded generator of our own, drawn from torch's global RNG: torch.manual_seed(s) before
            # make_private makes the noise reproducible, and nothing else consuming global randomness
            # (dropout, data augmentation) shifts the noise stream.
            device = private.collector.clipped_sum.device
            noise_generator = torch.Generator(device=device)
            noise_generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        dp_optimizer = DPOptimizer(optimizer, private.collector, noise_multiplier=noise_multiplier,
                                   max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                   loss_reduction=loss_reduction, generator=noise_generator,
                                   secure_mode=self.secure_mode)
        if poisson_sampling:
            dp_optimizer.before_step_checks.append(_one_poisson_batch_per_step(data_loader))
        dp_optimizer.attach_step_hook(
            lambda opt: self.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate))
        self.module, self.optimizer, self.data_loader, self.sample_rate = private, dp_optimizer, data_loader, sample_rate
        return private, dp_optimizer, data_loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: float, **kwargs):
        """Like ``make_private``, with the noise multiplier that reaches ``target_epsilon`` after
        ``epochs`` epochs, found by Opacus's search for this engine's accountant."""
        sample_rate = 1 / len(data_loader)
        if len(self.accountant) > 0:
            warnings.warn("make_private_with_epsilon with privacy budget already spent: the noise multiplier "
                          "assumes a zero starting point, so the total epsilon will be higher", stacklevel=2)
        search_kw = {k: kwargs.pop(k) for k in ("epsilon_tolerance", "alphas", "eps_error") if k in kwargs}
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                     sample_rate=sample_rate, epochs=epochs,
                                     accountant=self.accountant.mechanism(), **search_kw)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    # -- accounting -------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, from the Opacus accountant."""
        return self.accountant.get_epsilon(delta=delta)

    def privacy_report(self, delta: float) -> str:
        """One line naming the epsilon and which accountant produced it."""
        return (f"eps={self.get_epsilon(delta):.4f} at delta={delta:g} after {self.steps} steps "
                f"({self.accountant.mechanism()} accountant, Opacus {opacus.__version__})")

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in getattr(self.accountant, "history", []))

    def state_dict(self) -> dict:
        """Accountant ledger (and what produced it), to save in a checkpoint."""
        return {"mechanism": self.accountant.mechanism(), "accountant": self.accountant.state_dict(),
                "secure_mode": self.secure_mode}

    def load_state_dict(self, state: dict) -> None:
        """Resume the ledger of a saved run: later steps add to it."""
        if state["mechanism"] != self.accountant.mechanism():
            raise ValueError(f"checkpoint was accounted with {state['mechanism']!r}, this engine uses "
                             f"{self.accountant.mechanism()!r}: create PrivacyEngine(accountant="
                             f"{state['mechanism']!r}) to resume the same ledger")
        self.accountant.load_state_dict(state["accountant"])


def _one_poisson_batch_per_step(loader: PoissonDataLoader):
    """Each logical step must consume exactly one batch of the Poisson loader, or the accountant's
    sample rate would be wrong."""
    last = [loader.batches_drawn]

    def check() -> None:
        drawn = loader.batches_drawn - last[0]
        if drawn == 0:
            raise RuntimeError("optimizer.step() without a new batch from the Poisson data loader returned by "
                               "make_private: the accountant assumes every step uses one Poisson-sampled batch "
                               "(iterate that loader, or pass poisson_sampling=False and accept the caveat)")
        if drawn > 1:
            raise RuntimeError(f"{drawn} Poisson batches were used for one optimizer step: the accountant counts "
                               "one batch per step; step after each batch, or split one batch into physical "
                               "batches with dpdm_fast.BatchMemoryManager")
        last[0] = loader.batches_drawn

    return check
