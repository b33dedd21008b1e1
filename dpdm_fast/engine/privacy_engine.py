"""``PrivacyEngine``: a drop-in for ``opacus.PrivacyEngine`` with noise multiplicity."""
from __future__ import annotations

import os
import warnings
from typing import IO, Any, BinaryIO

import opacus
import torch
import torch.nn as nn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .dataset_hash import dataset_fingerprint
from .distributed import Replicas, exact_float, is_replicated_run
from .optimizer import DPOptimizer
from .mechanism import CALIBRATING_ACCOUNTANTS, batches_per_epoch, normaliser
from .poisson import make_poisson_loader, make_recording_loader
from .private_module import PrivateModule
from .validate import compatibility_errors, validate_module


class PrivacyEngine:
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
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.module: PrivateModule | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DataLoader | None = None
        self.sample_rate: float | None = None
        self.dataset = None
        if not secure_mode:
            warnings.warn("Secure RNG turned off: fine for experiments; use secure_mode=True for real releases.",
                          stacklevel=2)

    # -- compatibility (Opacus's names) ---------------------------------------------------------
    def is_compatible(self, *, module: nn.Module, optimizer: Optimizer | None = None,
                      data_loader: DataLoader | None = None) -> bool:
        """True when ``make_private`` would accept the module (see ``validate`` for the reasons)."""
        return not compatibility_errors(module)

    def validate(self, *, module: nn.Module, optimizer: Optimizer | None = None,
                 data_loader: DataLoader | None = None) -> None:
        """Raise ``UnsupportedModuleError`` listing every reason the module is not supported."""
        validate_module(module)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """Opacus's fixes (BatchNorm -> GroupNorm, ...), then validation."""
        module = ModuleValidator.fix(module)
        validate_module(module)
        return module

    # -- wrapping ---------------------------------------------------------------------------
    def make_private(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm: float, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, noise_generator: torch.Generator | None = None,
                     noise_multiplicity: int = 1, backend: str = "auto", strict: bool = False,
                     clipping: str = "flat", batch_first: bool = True, grad_sample_mode: str | None = None,
                     wrap_model: bool = True, rand_on_empty: bool = False, criterion: Any = None,
                     distributed: bool | None = None, public_dataset_size: int | None = None, **kwargs):
        """Returns (private module, DP optimizer, data loader), like Opacus.

        After ``loss.backward()`` on the mean (or sum) loss over B*K group-major rows, ``step()``
        applies: per example, the average of its K per-row gradients (Opacus-scaled for the loss
        reduction), clipped to ``max_grad_norm`` over all parameters, summed, plus
        N(0, (noise_multiplier * max_grad_norm)^2) per coordinate, divided by the expected batch
        size (for 'mean'), then the wrapped optimizer's step. A module returned by an earlier
        ``make_private`` is rebuilt with these settings (the earlier module and optimizer then refuse
        to train). ``wrap_model=False`` returns the model itself, hooked, instead of a wrapper.

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
        module, replicas = _replicas_for(module, distributed)
        if isinstance(module, PrivateModule):
            module = module.remove_hooks()   # rebuilt below with this call's settings
        model_params = {id(p) for p in module.parameters()}
        if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("Module parameters are different than optimizer Parameters (the optimizer holds "
                             "parameters that are not the module's)")

        private = PrivateModule(module, noise_multiplicity=noise_multiplicity, max_grad_norm=max_grad_norm,
                                loss_reduction=loss_reduction, backend=backend, strict=strict,
                                allow_direct_calls=not wrap_model)
        if rand_on_empty:
            raise NotImplementedError("rand_on_empty=True replaces an empty batch by a random example, which the "
                                      "per-step batch check rightly refuses: empty batches are handled as they are")
        _check_public_size(public_dataset_size)
        if poisson_sampling:
            requested = getattr(data_loader, "requested_batch_size", None) or data_loader.batch_size
            data_loader = make_poisson_loader(data_loader, secure_mode=self.secure_mode, shard=_shard(replicas),
                                              public_dataset_size=public_dataset_size)
            sample_rate = data_loader.sample_rate     # exactly the rate the sampler uses
        else:
            if replicas is not None:
                raise ValueError("distributed training needs poisson_sampling=True: the ranks' batches are shards of "
                                 "one Poisson batch")
            warnings.warn("poisson_sampling=False: the accountant's guarantee assumes Poisson sampling and "
                          "does not strictly hold for shuffled fixed-size batches", stacklevel=2)
            requested = getattr(data_loader, "batch_size", None)
            data_loader = make_recording_loader(data_loader)
            sample_rate = 1 / (len(data_loader) if public_dataset_size is None
                               else batches_per_epoch(public_dataset_size, data_loader.batch_size))
        if self.dataset is not None and self.dataset is not data_loader.dataset:
            warnings.warn("PrivacyEngine got a new dataset: accounting is per dataset; use a new PrivacyEngine "
                          "for a different dataset", stacklevel=2)
        self.dataset = data_loader.dataset
        expected_batch_size = _divisor(requested, public_dataset_size, sample_rate, len(data_loader.dataset))
        if expected_batch_size < 1:
            raise ValueError(f"expected batch size {expected_batch_size} < 1 (q={sample_rate:g}): use a larger batch")

        if replicas is not None:
            replicas.broadcast_module(module)   # every replica starts from rank 0's parameters
            replicas.agree({"noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
                            "noise multiplicity K": noise_multiplicity, "sample rate": sample_rate,
                            "dataset size": len(data_loader.dataset), "expected batch size": expected_batch_size,
                            "public dataset size": -1 if public_dataset_size is None else public_dataset_size,
                            "loss reduction is mean": loss_reduction == "mean", "secure_mode": self.secure_mode,
                            "accountant steps so far": self.steps,
                            "dataset (an order-sensitive hash: every rank must hold the same examples in the "
                            "same order)": exact_float(dataset_fingerprint(data_loader.dataset)),
                            "trainable parameters": private.collector.layout.size},
                           private.collector.layout_device, "make_private")
        dp_optimizer = DPOptimizer(optimizer, private.collector, noise_multiplier=noise_multiplier,
                                   expected_batch_size=expected_batch_size, generator=noise_generator,
                                   secure_mode=self.secure_mode, scale_by_accumulated_iterations=not poisson_sampling,
                                   replicas=replicas)
        dp_optimizer.ledger, dp_optimizer.one_batch_per_step = data_loader, poisson_sampling
        # k batches accumulated before one step (only without Poisson sampling) are one step at rate k*q (Opacus's rule)
        hook = lambda opt: self.accountant.step(  # noqa: E731
            noise_multiplier=opt.noise_multiplier, sample_rate=min(1.0, sample_rate * opt.accumulated_iterations))
        dp_optimizer.attach_step_hook(hook)
        self.module, self.optimizer, self.data_loader, self.sample_rate = private, dp_optimizer, data_loader, sample_rate
        return (private if wrap_model else module), dp_optimizer, data_loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: float, poisson_sampling: bool = True, **kwargs):
        """Like ``make_private``, with the noise multiplier that reaches ``target_epsilon`` after
        ``epochs`` epochs, found by Opacus's search for this engine's accountant at exactly the
        sample rate the returned loader uses."""
        public_size = kwargs.get("public_dataset_size")
        _check_public_size(public_size)
        if poisson_sampling:
            _, replicas = _replicas_for(module, kwargs.get("distributed"))
            requested = getattr(data_loader, "requested_batch_size", None) or data_loader.batch_size
            data_loader = make_poisson_loader(data_loader, secure_mode=self.secure_mode, shard=_shard(replicas),
                                              public_dataset_size=public_size)
            data_loader.requested_batch_size = requested
            sample_rate = data_loader.sample_rate
        else:
            sample_rate = 1 / (len(data_loader) if public_size is None
                               else batches_per_epoch(public_size, data_loader.batch_size))
        if self.accountant.mechanism() not in CALIBRATING_ACCOUNTANTS:
            raise ValueError(f"make_private_with_epsilon with the {self.accountant.mechanism()!r} accountant: its eps "
                             "is an approximation (Opacus's GDP accountant is a central-limit approximation), not an "
                             "upper bound, so it cannot calibrate the noise; use PrivacyEngine(accountant='rdp') or "
                             "'prv' (GDP may still report an approximate eps beside them)")
        if len(self.accountant) > 0:
            warnings.warn("make_private_with_epsilon with privacy budget already spent: the noise multiplier "
                          "assumes a zero starting point, so the total epsilon will be higher", stacklevel=2)
        search_kw = {k: kwargs.pop(k) for k in ("epsilon_tolerance", "alphas", "eps_error") if k in kwargs}
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                     sample_rate=sample_rate, epochs=epochs,
                                     accountant=self.accountant.mechanism(), **search_kw)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                 poisson_sampling=poisson_sampling, **kwargs)

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

    # -- checkpoints (Opacus's format) -------------------------------------------------------
    def save_checkpoint(self, *, path: str | os.PathLike | BinaryIO | IO[bytes], module: nn.Module,
                        optimizer: Optimizer | None = None, noise_scheduler=None, grad_clip_scheduler=None,
                        checkpoint_dict: dict | None = None, module_state_dict_kwargs: dict | None = None,
                        torch_save_kwargs: dict | None = None) -> None:
        """Module (plain keys), accountant, optimizer and scheduler states in Opacus's checkpoint layout."""
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        checkpoint["privacy_accountant_mechanism"] = self.accountant.mechanism()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        if noise_scheduler is not None:
            checkpoint["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            checkpoint["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(self, *, path: str | os.PathLike | BinaryIO | IO[bytes], module: nn.Module,
                        optimizer: Optimizer | None = None, noise_scheduler=None, grad_clip_scheduler=None,
                        module_load_dict_kwargs: dict | None = None, torch_load_kwargs: dict | None = None) -> dict:
        """Restore what ``save_checkpoint`` (ours or Opacus's) wrote; returns the checkpoint dict."""
        checkpoint = torch.load(path, **{"weights_only": False, **(torch_load_kwargs or {})})
        mechanism = checkpoint.get("privacy_accountant_mechanism", self.accountant.mechanism())
        if mechanism != self.accountant.mechanism():
            raise ValueError(f"checkpoint was accounted with {mechanism!r}, this engine uses "
                             f"{self.accountant.mechanism()!r}: create PrivacyEngine(accountant={mechanism!r})")
        module.load_state_dict(checkpoint["module_state_dict"], **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
        for obj, key in ((optimizer, "optimizer_state_dict"), (noise_scheduler, "noise_scheduler_state_dict"),
                         (grad_clip_scheduler, "grad_clip_scheduler_state_dict")):
            state = checkpoint.pop(key, {})
            if obj is not None and state:
                obj.load_state_dict(state)
            elif (obj is not None) != bool(state):
                warnings.warn(f"{key} has {len(state)} items but the {key.rsplit('_state', 1)[0]} is "
                              f"{'' if obj is not None else 'not '}provided", stacklevel=2)
        return checkpoint


def _replicas_for(module: nn.Module, distributed: bool | None) -> tuple[nn.Module, Replicas | None]:
    """The model to wrap and the ranks it is trained across (None: this process alone)."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(module, DistributedDataParallel):
        raise ValueError("the module is wrapped in torch's DistributedDataParallel, which all-reduces ordinary "
                         "(unclipped) gradients: pass the plain model with make_private(distributed=True); the engine "
                         "all-reduces the clipped sums itself")
    try:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    except ImportError:   # pragma: no cover (opacus is a dependency)
        DPDDP = ()
    if isinstance(module, DPDDP):
        if distributed is False:
            raise ValueError("distributed=False with a DPDDP-wrapped module: pass the plain model, or distributed=True")
        module, distributed = module.module, True
    if distributed is None:
        if is_replicated_run():
            raise ValueError(f"this process is one of {torch.distributed.get_world_size()} in a torch.distributed job: "
                             "pass make_private(distributed=True) to train one model across them (each rank samples "
                             "its shard, clipped sums are all-reduced, the noise is added once), or "
                             "distributed=False to train a separate model on each rank (each with its own "
                             "guarantee; releasing several composes them)")
        distributed = False
    return module, (Replicas.current() if distributed else None)


def _check_public_size(public_dataset_size) -> None:
    if public_dataset_size is not None and (isinstance(public_dataset_size, bool) or
                                            not isinstance(public_dataset_size, int) or public_dataset_size < 1):
        raise ValueError(f"public_dataset_size must be a positive int (a public bound or estimate of the dataset's "
                         f"size), got {public_dataset_size!r}")


def _divisor(requested_batch_size: int | None, public_dataset_size: int | None, sample_rate: float,
             realised_size: int) -> float:
    """The update's divisor from public numbers (see ``make_private``). A Poisson loader built by the user
    (no requested batch size) and no public size: Opacus's N q, the dataset size being treated as public."""
    if public_dataset_size is not None or requested_batch_size is not None:
        return normaliser(requested_batch_size or 0, public_dataset_size, sample_rate)
    return normaliser(0, realised_size, sample_rate)


def _shard(replicas: Replicas | None) -> tuple[int, int]:
    return (0, 1) if replicas is None else (replicas.rank, replicas.world_size)
