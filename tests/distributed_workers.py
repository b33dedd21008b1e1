"""What the ranks of the distributed tests run (imported by spawned processes, so at module level).

``scenario(name, distributed)`` trains a tiny model with the engine on a fixed dataset whose labels
are the example indices, and returns what the tests compare: the parameters after every step, the
indices each step trained on, epsilon. The one-process reference runs the same function.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
import traceback
import warnings
from contextlib import closing
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dpdm_fast import BatchMemoryManager, PrivacyEngine

N, BATCH, K, DELTA = 24, 8, 3, 1e-5
SCENARIOS = {   # sigma, optimizer, learning rate, steps, global batch (q = batch / N), zero loss, width, secure
    "sgd_clean": dict(sigma=0.0, opt="sgd", lr=1.0, steps=1, batch=BATCH, zero_loss=False, width=16, secure=False),
    "sgd_noisy": dict(sigma=1.0, opt="sgd", lr=0.5, steps=3, batch=BATCH, zero_loss=False, width=16, secure=False),
    "adam_noisy": dict(sigma=1.0, opt="adam", lr=1e-2, steps=5, batch=BATCH, zero_loss=False, width=16, secure=False),
    # q = 1/12: about one example per rank per step, so some ranks' shards are empty (still stepped)
    "sparse_noisy": dict(sigma=1.0, opt="sgd", lr=0.5, steps=8, batch=2, zero_loss=False, width=16, secure=False),
    "noise_only": dict(sigma=1.0, opt="sgd", lr=1.0, steps=1, batch=BATCH, zero_loss=True, width=2048, secure=False),
    # OS-seeded sampling and noise: no one-process twin, but the same checks on shards and replicas
    "secure": dict(sigma=1.0, opt="sgd", lr=0.5, steps=3, batch=BATCH, zero_loss=False, width=16, secure=True),
}


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, width), nn.SiLU(), nn.Linear(width, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 1, 6, 6, generator=g), torch.arange(N)


def scenario(name: str, distributed: bool, *, double_noise: bool = False) -> dict:
    """Train ``name`` (see SCENARIOS); ``double_noise``: every rank adds noise (the bug the tests must catch)."""
    c = SCENARIOS[name]
    torch.manual_seed(1 + (dist.get_rank() if distributed else 0))   # different init per rank: rank 0's is broadcast
    model = _model(c["width"])
    optimizer = (torch.optim.SGD if c["opt"] == "sgd" else torch.optim.Adam)(model.parameters(), lr=c["lr"])
    x, idx = _data()
    loader = DataLoader(TensorDataset(x, idx), batch_size=c["batch"], shuffle=True,
                        generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp", secure_mode=c["secure"])
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=c["sigma"], max_grad_norm=1.0,
        noise_multiplicity=K, noise_generator=None if c["secure"] else torch.Generator().manual_seed(3),
        distributed=distributed)
    steps, zero_loss = c["steps"], c["zero_loss"]
    if double_noise:   # every rank believes it is the one that adds the noise
        optimizer.replicas = dataclasses.replace(optimizer.replicas, rank=0)
    offsets = 0.1 * torch.randn(K, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    target = torch.randn(3, generator=torch.Generator().manual_seed(5))
    params = [_flat(model)]
    batches, seen = [], []
    while engine.steps < steps:
        # each logical batch split into physical batches of at most 2 examples
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer) as physical:
            for xb, ib in physical:
                rows = xb.repeat_interleave(K, 0) + offsets.repeat(len(xb), 1, 1, 1)   # K rows per example
                loss = ((model(rows) - target) ** 2).mean(dim=1)
                (loss * 0 if zero_loss else loss).mean().backward()
                before = engine.steps
                optimizer.step()
                optimizer.zero_grad()
                seen += ib.tolist()
                if engine.steps > before:
                    batches.append(sorted(seen))
                    params.append(_flat(model))
                    seen = []
                    if engine.steps == steps:
                        break
    return {"params": params, "batches": batches, "epsilon": engine.get_epsilon(DELTA), "steps": engine.steps,
            "sample_rate": engine.sample_rate, "expected_batch": optimizer.expected_batch_size}


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def refusal(kind: str) -> dict:
    """A rank breaks the rules at step 2; returns (never: it must raise on every rank)."""
    model = _model(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, idx = _data()
    if kind == "permuted" and dist.get_rank() == 1:   # the same examples in another order on one rank
        x, idx = x.flip(0), idx.flip(0)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, idx), batch_size=BATCH, generator=torch.Generator().manual_seed(2)),
        noise_multiplier=1.0, max_grad_norm=1.0, distributed=True)
    rank = dist.get_rank()
    for step, (xb, _) in enumerate(loader):
        if step == 1 and rank == 1:
            if kind == "setting":
                optimizer.noise_multiplier = 0.5     # less noise on one rank only
            elif kind == "crash":
                raise SystemExit(3)                  # the process dies without a word to the others
            elif kind == "forward_error":            # raises, tells the others, and stays alive a while
                try:
                    raise RuntimeError("boom in rank 1's forward")
                except RuntimeError:
                    optimizer.abandon_step()
                    time.sleep(15)
                    raise
        loss = model(xb).pow(2).mean(dim=1).mean()
        loss.backward()
        if step == 1 and rank == 1 and kind == "double_backward":
            model(xb).pow(2).mean(dim=1).mean().backward()    # the batch's examples clipped twice
        optimizer.step()
        optimizer.zero_grad()
    return {"finished": True}


def all_scenarios() -> dict:
    out = {name: scenario(name, distributed=True) for name in SCENARIOS}
    out["noise_only_double"] = scenario("noise_only", distributed=True, double_noise=True)
    return out


def wrapping_choices() -> dict:
    """What make_private says inside a 2-process job without distributed=..., and around torch's DDP."""
    from torch.nn.parallel import DistributedDataParallel
    x, idx = _data()
    loader = DataLoader(TensorDataset(x, idx), batch_size=BATCH)
    errors = {}
    for name, module, kwargs in (("implicit", _model(4), {}), ("ddp", DistributedDataParallel(_model(4)), {"distributed": True})):
        try:
            PrivacyEngine().make_private(module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # Opacus's DPDDP wrapper asks for the same; so does make_private_with_epsilon(distributed=True)
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    wrapped = DPDDP(_model(4))
    _, opt, dpddp_loader = PrivacyEngine().make_private(
        module=wrapped, optimizer=torch.optim.SGD(wrapped.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0)
    model = _model(4)
    engine = PrivacyEngine(accountant="rdp")
    _, opt2, eps_loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, target_epsilon=3.0,
        target_delta=1e-5, epochs=2, max_grad_norm=1.0, distributed=True)
    errors["shards"] = [dpddp_loader.shard, eps_loader.shard, opt.replicas is not None, opt2.replicas is not None]
    errors["sigma"] = opt2.noise_multiplier
    return errors


def rank_main(rank: int, world: int, port: int, out: str, task: str, kwargs: dict) -> None:
    """Entry point of one spawned rank: run ``task`` and save its result (or the error it raised)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = {"ok": globals()[task](**kwargs)}
    except BaseException as e:   # noqa: BLE001 (SystemExit included: reported like any failure)
        result = {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc(), "at": time.time()}
        if isinstance(e, SystemExit):
            torch.save(result, Path(out) / f"rank{rank}.pt")
            os._exit(int(e.code or 1))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
