"""``make_private``'s checks and pieces: which arguments are refused, which ranks train, the private
loader with its rate and divisor from public numbers, and the ranks' agreement at wrap time."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..distributed import Replicas, dataset_fingerprint, exact_float, is_replicated_run
from ..mechanism import batches_per_epoch, normaliser
from ..sampling import make_poisson_loader, make_recording_loader
from .private_module import PrivateModule


ADAPTIVE_ARGS = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound", "min_clipbound",
                 "unclipped_num_std")
# Opacus's modes: every one is computed by this engine's rules, exactly (see ``PrivacyEngine.make_private``)
GRAD_SAMPLE_MODES = (None, "hooks", "functorch", "ew", "ghost")


def clipping_options(clipping: str, kwargs: dict) -> dict:
    """The arguments of the clipping mode, taken out of ``kwargs`` (Opacus passes them through **kwargs)."""
    if clipping not in ("flat", "per_layer", "adaptive"):
        raise ValueError(f"clipping={clipping!r}: expected 'flat', 'per_layer' or 'adaptive'")
    if clipping != "adaptive":
        return {}
    missing = [a for a in ADAPTIVE_ARGS if a not in kwargs]
    if missing:
        raise TypeError(f"clipping='adaptive' needs {missing} (Opacus's AdaClipDPOptimizer arguments)")
    return {a: kwargs.pop(a) for a in ADAPTIVE_ARGS}


def layout_bounds(clipping: str, max_grad_norm, optimizer, trainable: list) -> float | list:
    """``max_grad_norm`` for the private module: per-layer bounds come in the optimizer's order of its
    trainable parameters (Opacus's) and are put in the engine's (the model's) order."""
    if clipping != "per_layer":
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError(f"a list of max_grad_norm bounds needs clipping='per_layer' (got clipping={clipping!r})")
        return max_grad_norm
    if not isinstance(max_grad_norm, (list, tuple)):
        raise ValueError("clipping='per_layer' takes max_grad_norm as a list, one bound per trainable parameter "
                         "in the optimizer's order (as Opacus)")
    ordered = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if len(max_grad_norm) != len(ordered):
        raise ValueError(f"clipping='per_layer': {len(max_grad_norm)} bounds for the optimizer's {len(ordered)} "
                         "trainable parameters")
    bound = {id(p): b for p, b in zip(ordered, max_grad_norm)}
    missing = [i for i, p in enumerate(trainable) if id(p) not in bound]
    if missing:
        raise ValueError("clipping='per_layer': some trainable parameters of the model are not in the optimizer, "
                         "so they have no bound; freeze them or give them to the optimizer")
    return [bound[id(p)] for p in trainable]


def refuse_unsupported(kwargs: dict, grad_sample_mode, rand_on_empty: bool) -> None:
    """Opacus arguments this engine does not implement: an error, never ignored."""
    if kwargs:
        raise TypeError(f"make_private got unsupported arguments {sorted(kwargs)}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r}: expected one of {GRAD_SAMPLE_MODES[1:]} (all "
                         "computed by this engine's per-example rules)")
    if rand_on_empty:
        raise NotImplementedError("rand_on_empty=True replaces an empty batch by a random example, which the "
                                  "per-step batch check rightly refuses: empty batches are handled as they are")


def plain_model(module: nn.Module, optimizer) -> nn.Module:
    """The model to wrap (a private module of an earlier call is unwrapped: it is rebuilt with the new
    settings, and the earlier module and optimizer then refuse to train); the optimizer must hold its
    parameters only."""
    if isinstance(module, PrivateModule):
        module = module.remove_hooks()
    model_params = {id(p) for p in module.parameters()}
    if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("Module parameters are different than optimizer Parameters (the optimizer holds "
                         "parameters that are not the module's)")
    return module


@dataclass
class PrivateLoader:
    """The loader make_private returns, the sample rate the accountant is told, and the update's divisor."""
    loader: DataLoader
    sample_rate: float
    divisor: float


def private_loader(data_loader: DataLoader, *, poisson_sampling: bool, secure_mode: bool,
                   replicas: Replicas | None, public_dataset_size: int | None,
                   batch_first: bool = True) -> PrivateLoader:
    """Poisson loader (or, without Poisson sampling, a recording one) with q and the divisor from public
    numbers (see ``PrivacyEngine.make_private``)."""
    check_public_size(public_dataset_size)
    if poisson_sampling:
        requested = getattr(data_loader, "requested_batch_size", None) or data_loader.batch_size
        loader = make_poisson_loader(data_loader, secure_mode=secure_mode, shard=shard(replicas),
                                     public_dataset_size=public_dataset_size, batch_first=batch_first)
        loader.requested_batch_size = requested
        sample_rate = loader.sample_rate     # exactly the rate the sampler uses
    else:
        if replicas is not None:
            raise ValueError("distributed training needs poisson_sampling=True: the ranks' batches are shards of "
                             "one Poisson batch")
        warnings.warn("poisson_sampling=False: the accountant's guarantee assumes Poisson sampling and "
                      "does not strictly hold for shuffled fixed-size batches", stacklevel=3)
        requested = getattr(data_loader, "batch_size", None)
        loader = make_recording_loader(data_loader)
        sample_rate = 1 / (len(loader) if public_dataset_size is None
                           else batches_per_epoch(public_dataset_size, loader.batch_size))
    divisor = _divisor(requested, public_dataset_size, sample_rate, len(loader.dataset))
    if divisor < 1:
        raise ValueError(f"expected batch size {divisor} < 1 (q={sample_rate:g}): use a larger batch")
    return PrivateLoader(loader, sample_rate, divisor)


def check_public_size(public_dataset_size) -> None:
    if public_dataset_size is not None and (isinstance(public_dataset_size, bool) or
                                            not isinstance(public_dataset_size, int) or public_dataset_size < 1):
        raise ValueError(f"public_dataset_size must be a positive int (a public bound or estimate of the dataset's "
                         f"size), got {public_dataset_size!r}")


def _divisor(requested_batch_size: int | None, public_dataset_size: int | None, sample_rate: float,
             realised_size: int) -> float:
    """The update's divisor from public numbers. A Poisson loader built by the user (no requested batch
    size) and no public size: Opacus's N q, the dataset size being treated as public."""
    if public_dataset_size is not None or requested_batch_size is not None:
        return normaliser(requested_batch_size or 0, public_dataset_size, sample_rate)
    return normaliser(0, realised_size, sample_rate)


def agree_at_wrap(replicas: Replicas, module: nn.Module, private: PrivateModule, wrapped: PrivateLoader,
                  settings: dict) -> None:
    """Every replica starts from rank 0's parameters, and the ranks agree on the mechanism and the data."""
    replicas.broadcast_module(module)
    dataset = wrapped.loader.dataset
    data_hash = ("dataset (an order-sensitive hash: every rank must hold the same examples in the same order)")
    replicas.agree({**settings, "sample rate": wrapped.sample_rate, "dataset size": len(dataset),
                    "expected batch size": wrapped.divisor, data_hash: exact_float(dataset_fingerprint(dataset)),
                    "trainable parameters": private.collector.layout.size},
                   private.collector.layout_device, "make_private", withheld=("dataset size", data_hash))


def replicas_for(module: nn.Module, distributed: bool | None) -> tuple[nn.Module, Replicas | None]:
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


def shard(replicas: Replicas | None) -> tuple[int, int]:
    return (0, 1) if replicas is None else (replicas.rank, replicas.world_size)
