"""``PrivacyEngine``: a drop-in for ``opacus.PrivacyEngine`` with noise multiplicity."""
from __future__ import annotations

import os
import warnings
from typing import IO, Any, BinaryIO

import torch
import torch.nn as nn
from opacus.accountants.utils import get_noise_multiplier
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ..mechanism import CALIBRATING_ACCOUNTANTS
from . import opacus_checkpoint
from .accounting import Accounting
from .compatibility import ModuleCompatibility
from .adaptive_clipping import AdaClipDPOptimizer
from .dp_loss import DPLoss
from .optimizer import DPOptimizer
from .private_module import PrivateModule
from .wrapping import (agree_at_wrap, clipping_options, layout_bounds, plain_model, private_loader,
                       refuse_unsupported, replicas_for)


class PrivacyEngine(Accounting, ModuleCompatibility):
    """DP-SGD with per-example clipping of groups of K rows (DPDM's noise multiplicity).

    Same constructor and ``make_private`` / ``make_private_with_epsilon`` / ``get_epsilon`` /
    ``save_checkpoint`` / ``load_checkpoint`` as Opacus; accounting is Opacus's own accountants
    ('rdp', 'prv', 'gdp').

    ``secure_mode=False`` (default): noise from ``noise_generator`` if given, else from torch's
    global RNG (as Opacus: ``torch.manual_seed`` fixes it). ``secure_mode=True``: noise from a
    generator seeded from ``os.urandom`` and re-seeded from it after every step, the Poisson
    sampler re-seeded from it before every batch, and Opacus's floating-point-attack defence (sum
    of 4 draws / 2). The streams are then unpredictable from any seed in code or config; torch's
    generators are not themselves cryptographic PRNGs.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        super().__init__(accountant)
        self.secure_mode = secure_mode
        self.module: PrivateModule | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DataLoader | None = None
        self.sample_rate: float | None = None
        self.dataset = None
        if not secure_mode:
            warnings.warn("Secure RNG turned off: fine for experiments; use secure_mode=True for real releases.",
                          stacklevel=2)

    # -- wrapping ---------------------------------------------------------------------------
    def make_private(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm: float | list, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, noise_generator: torch.Generator | None = None,
                     noise_multiplicity: int = 1, backend: str = "auto", strict: bool = False,
                     clipping: str = "flat", batch_first: bool = True, grad_sample_mode: str | None = None,
                     wrap_model: bool = True, rand_on_empty: bool = False, criterion: Any = None,
                     distributed: bool | None = None, public_dataset_size: int | None = None,
                     grad_sample_views: bool = True, **kwargs):
        """Returns (private module, DP optimizer, data loader), like Opacus.

        After ``loss.backward()`` on the mean (or sum) loss over B*K group-major rows, ``step()``
        applies: per example, the average of its K per-row gradients (Opacus-scaled for the loss
        reduction), clipped to ``max_grad_norm`` over all parameters, summed, plus
        N(0, (noise_multiplier * max_grad_norm)^2) per coordinate, divided by the expected batch
        size (for 'mean'), then the wrapped optimizer's step. A module returned by an earlier
        ``make_private`` is rebuilt with these settings (the earlier module and optimizer then refuse
        to train). ``wrap_model=False`` returns the model itself, hooked, instead of a wrapper.

        Opacus's options, all computed exactly by this engine's rules:
        - ``clipping="per_layer"``: ``max_grad_norm`` a list, one bound per trainable parameter in the
          optimizer's order; each parameter's per-example gradient is clipped to its bound, and the noise
          is scaled to the L2 norm of the bounds (Opacus's ``DPPerLayerOptimizer``).
        - ``clipping="adaptive"`` with Opacus's ``target_unclipped_quantile``, ``clipbound_learning_rate``,
          ``max_clipbound``, ``min_clipbound``, ``unclipped_num_std``: see ``AdaClipDPOptimizer``.
        - ``batch_first=False``: the batch is dim 1 of the model's inputs and of every layer's input and
          output (Opacus's ``RNNLinear``, run per time step, keeps it on dim 0).
        - ``grad_sample_mode``: "hooks", "functorch", "ew" and "ghost" all run this engine's one backward;
          "ghost" also returns Opacus's fourth value, a loss wrapper built from ``criterion``
          (``DPLoss``), whose ``backward()`` is the reduced loss's.
        - After each backward, ``p.grad_sample`` and ``p.summed_grad`` are views of the engine's
          per-example buffer and clipped sum (see ``dpdm_fast.engine.clipping.opacus_views``); the views
          cost one scaling pass over the buffer per backward, which ``grad_sample_views=False`` (what
          the DPDM trainer passes) saves: the attributes are then not set.

        ``distributed=True`` (or a module wrapped in Opacus's ``DPDDP``) trains one model across the
        ranks of the initialised torch.distributed job (see ``dpdm_fast.engine.distributed``): rank 0's
        parameters are broadcast, each rank Poisson-samples its shard of every batch at the rate of
        ``data_loader`` (pass every rank the same loader over the whole dataset, with ``batch_size``
        the *global* expected batch: the rate, the noise and epsilon do not depend on the number of
        ranks), one all-reduce per step sums the clipped gradients, rank 0 adds the noise, and every
        rank's accountant records the same steps. Inside a job of several processes the choice must
        be explicit: ``distributed=False`` trains a separate model on each rank (each its own guarantee).

        ``public_dataset_size=N`` fixes the mechanism from a public number: q = 1 / ceil(N / batch_size)
        (so the number of steps per epoch too) and the divisor N q. Without it, q and the steps come
        from the realised dataset size, as in Opacus, which is then treated as public (under add/remove
        neighbours q reveals it); the divisor is the loader's ``batch_size`` either way, never the
        realised N q (Opacus's divisor, which reveals N through the scale of the noise).
        """
        adaptive = clipping_options(clipping, kwargs)
        refuse_unsupported(kwargs, grad_sample_mode, rand_on_empty)
        if noise_generator is not None and self.secure_mode:
            raise ValueError("passing noise_generator is prohibited in secure mode")
        module, replicas = replicas_for(module, distributed)
        module = plain_model(module, optimizer)
        if replicas is not None and clipping == "per_layer":
            raise NotImplementedError("per-layer clipping in a distributed run: use flat clipping")
        bounds = layout_bounds(clipping, max_grad_norm, optimizer, [p for p in module.parameters() if p.requires_grad])
        private = PrivateModule(module, noise_multiplicity=noise_multiplicity, max_grad_norm=bounds,
                                loss_reduction=loss_reduction, backend=backend, strict=strict,
                                allow_direct_calls=not wrap_model, batch_first=batch_first,
                                grad_sample_views=grad_sample_views)
        wrapped = private_loader(data_loader, poisson_sampling=poisson_sampling, secure_mode=self.secure_mode,
                                 replicas=replicas, public_dataset_size=public_dataset_size,
                                 batch_first=batch_first)
        data_loader, sample_rate = wrapped.loader, wrapped.sample_rate
        if self.dataset is not None and self.dataset is not data_loader.dataset:
            warnings.warn("PrivacyEngine got a new dataset: accounting is per dataset; use a new PrivacyEngine "
                          "for a different dataset", stacklevel=2)
        self.dataset = data_loader.dataset
        if replicas is not None:
            agree_at_wrap(replicas, module, private, wrapped, {
                "noise_multiplier": noise_multiplier, "max_grad_norm": private.max_grad_norm,
                "noise multiplicity K": noise_multiplicity, "loss reduction is mean": loss_reduction == "mean",
                "public dataset size": -1 if public_dataset_size is None else public_dataset_size,
                "secure_mode": self.secure_mode, "accountant steps so far": self.steps})
        optimizer_class = AdaClipDPOptimizer if clipping == "adaptive" else DPOptimizer
        dp_optimizer = optimizer_class(optimizer, private.collector, noise_multiplier=noise_multiplier,
                                       expected_batch_size=wrapped.divisor, generator=noise_generator,
                                       secure_mode=self.secure_mode,
                                       scale_by_accumulated_iterations=not poisson_sampling, replicas=replicas,
                                       **adaptive)
        dp_optimizer.ledger, dp_optimizer.one_batch_per_step = data_loader, poisson_sampling
        # k batches accumulated before one step (only without Poisson sampling) are one step at rate k*q (Opacus's rule)
        hook = lambda opt: self.accountant.step(  # noqa: E731
            noise_multiplier=opt.noise_multiplier, sample_rate=min(1.0, sample_rate * opt.accumulated_iterations))
        dp_optimizer.attach_step_hook(hook)
        self.module, self.optimizer, self.data_loader, self.sample_rate = private, dp_optimizer, data_loader, sample_rate
        if grad_sample_mode == "ghost":   # Opacus's ghost API: the loss wrapper as a fourth value
            return (private if wrap_model else module), dp_optimizer, DPLoss(criterion, loss_reduction), data_loader
        return (private if wrap_model else module), dp_optimizer, data_loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: float, poisson_sampling: bool = True, **kwargs):
        """Like ``make_private``, with the noise multiplier that reaches ``target_epsilon`` after
        ``epochs`` epochs, found by Opacus's search for this engine's accountant at exactly the
        sample rate the returned loader uses. Only accountants whose eps is an upper bound calibrate."""
        if self.accountant.mechanism() not in CALIBRATING_ACCOUNTANTS:
            raise ValueError(f"make_private_with_epsilon with the {self.accountant.mechanism()!r} accountant: its eps "
                             "is an approximation (Opacus's GDP accountant is a central-limit approximation), not an "
                             "upper bound, so it cannot calibrate the noise; use PrivacyEngine(accountant='rdp') or "
                             "'prv' (GDP may still report an approximate eps beside them)")
        _, replicas = replicas_for(module, kwargs.get("distributed")) if poisson_sampling else (module, None)
        with warnings.catch_warnings():   # make_private warns about non-Poisson sampling itself
            warnings.simplefilter("ignore")
            wrapped = private_loader(data_loader, poisson_sampling=poisson_sampling, secure_mode=self.secure_mode,
                                     replicas=replicas, public_dataset_size=kwargs.get("public_dataset_size"))
        if poisson_sampling:
            data_loader = wrapped.loader
        if len(self.accountant) > 0:
            warnings.warn("make_private_with_epsilon with privacy budget already spent: the noise multiplier "
                          "assumes a zero starting point, so the total epsilon will be higher", stacklevel=2)
        search_kw = {k: kwargs.pop(k) for k in ("epsilon_tolerance", "alphas", "eps_error") if k in kwargs}
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                     sample_rate=wrapped.sample_rate, epochs=epochs,
                                     accountant=self.accountant.mechanism(), **search_kw)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                 poisson_sampling=poisson_sampling, **kwargs)

    # -- checkpoints (Opacus's format: see opacus_checkpoint) ---------------------------------
    def save_checkpoint(self, *, path: str | os.PathLike | BinaryIO | IO[bytes], module: nn.Module,
                        optimizer: Optimizer | None = None, **kwargs) -> None:
        """Module (plain keys), accountant, optimizer and scheduler states in Opacus's checkpoint layout."""
        opacus_checkpoint.save_checkpoint(self.accountant, path=path, module=module, optimizer=optimizer, **kwargs)

    def load_checkpoint(self, *, path: str | os.PathLike | BinaryIO | IO[bytes], module: nn.Module,
                        optimizer: Optimizer | None = None, **kwargs) -> dict:
        """Restore what ``save_checkpoint`` (ours or Opacus's) wrote; returns the checkpoint dict."""
        return opacus_checkpoint.load_checkpoint(self.accountant, path=path, module=module, optimizer=optimizer,
                                                 **kwargs)
