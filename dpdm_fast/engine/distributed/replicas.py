"""One model trained across the ranks of a torch.distributed job, with one guarantee.

DP-SGD across R ranks is the one-process mechanism exactly when
- every example is Poisson-sampled once per step, at the global rate q (each rank keeps its shard
  of the same kind of mask: ``PoissonBatchSampler(shard=...)``);
- the clipped per-example gradients of all ranks are summed, and the noise N(0, (sigma C)^2) is
  added to that sum once: rank 0 adds it to its own share before the sum, the others add none;
- the sum is divided by the global expected batch size N q, and every rank applies the same result.

Each step is therefore one flat all-reduce (SUM) of the ranks' ``(clipped sum [+ noise]) / (N q)``,
the fp32 tensor the ``.grad`` views already point into, plus one small all-gather that makes the
ranks agree on what they are doing (step count, noise multiplier, clipping norm, divisor, and every
``CHECK_EVERY`` steps a checksum of the parameters) before anything is released. A rank whose own
checks refuse a step still joins that exchange, so all ranks stop together instead of hanging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

CHECK_EVERY = 10   # steps between parameter checksums (the first step is always checked)


class ReplicaError(RuntimeError):
    """The ranks disagree, or a collective with the other ranks failed."""


def collective_failed(rank: int, what: str, error: BaseException) -> ReplicaError:
    return ReplicaError(f"rank {rank}: the {what} with the other ranks failed ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else ''}). Another rank has most likely "
                        "stopped with an error: see its log. This job stops here; fix the cause and resume from the "
                        "last checkpoint (dpdm-fast train ... --resume)")


@dataclass
class Replicas:
    """The ranks of the (default) process group, each holding a replica of the model."""
    rank: int
    world_size: int
    backend: str

    @classmethod
    def current(cls) -> "Replicas":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs torch.distributed initialised first "
                               "(torch.distributed.init_process_group, or launch with torchrun)")
        return cls(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))

    @property
    def adds_noise(self) -> bool:
        """Only rank 0 draws the step's noise; the all-reduce hands it to every rank."""
        return self.rank == 0

    def _device(self, like: torch.device) -> torch.device:
        # NCCL moves CUDA tensors only; gloo works on CPU tensors everywhere.
        return like if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, flat: torch.Tensor) -> None:
        """In place: ``flat`` becomes the sum over ranks (one collective for the whole model)."""
        device = self._device(flat.device)
        try:
            if device == flat.device:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            else:
                staged = flat.to(device)
                dist.all_reduce(staged, op=dist.ReduceOp.SUM)
                flat.copy_(staged)
        except (RuntimeError, dist.DistBackendError) as e:
            raise collective_failed(self.rank, "all-reduce of the clipped gradients", e) from e

    def sum_values(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of every rank's ``values`` (one small all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._device(device))
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except (RuntimeError, dist.DistBackendError) as e:
            raise collective_failed(self.rank, "end-of-step exchange", e) from e
        return t.tolist()

    def gather(self, values: list[float], device: torch.device) -> torch.Tensor:
        """(world_size, len(values)) float64 table of every rank's ``values`` (on the CPU)."""
        mine = torch.tensor(values, dtype=torch.float64, device=self._device(device))
        table = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(table, mine)
        except (RuntimeError, dist.DistBackendError) as e:
            raise collective_failed(self.rank, "step check", e) from e
        return torch.stack(table).cpu()

    def agree(self, values: dict[str, float], device: torch.device, context: str, withheld: tuple = ()) -> None:
        """Every rank passes the same names; raises on every rank when any value differs between ranks.
        A value ``ok`` = 0 means that rank refused (its own error explains why). The values of the names in
        ``withheld`` (functions of the training data: a hash, the dataset's size) are never put in the
        error, which ends up in logs: it says which ranks differ, not how."""
        names = list(values)
        table = self.gather([float(values[n]) for n in names], device)
        if "ok" in values:
            failed = [r for r in range(self.world_size) if table[r, names.index("ok")] != 1]
            if failed:
                raise ReplicaError(f"rank(s) {failed} refused {context} (see their error); every rank stops with "
                                   "them so that none waits forever for the others")
        for i, name in enumerate(names):
            column = table[:, i]
            if not torch.equal(column, column[:1].expand_as(column)):
                if name in withheld:
                    per_rank = "ranks " + ", ".join(str(r) for r in range(self.world_size) if column[r] != column[0])
                    per_rank += " differ from rank 0; values withheld: they are derived from the training data"
                else:
                    per_rank = ", ".join(f"rank {r}: {column[r].item():.17g}" for r in range(self.world_size))
                raise ReplicaError(f"the ranks disagree on {name} at {context} ({per_rank}): every rank must run "
                                   "the same configuration and change settings identically (a setting changed on "
                                   "one rank, or parameters that drifted apart, would leave the printed "
                                   "guarantee describing none of them)")

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (so every replica starts identical)."""
        try:
            for t in [*module.parameters(), *module.buffers()]:
                device = self._device(t.device)
                staged = t.detach() if device == t.device else t.detach().to(device)
                dist.broadcast(staged, src=0)
                if staged is not t:
                    with torch.no_grad():
                        t.copy_(staged)
        except (RuntimeError, dist.DistBackendError) as e:
            raise collective_failed(self.rank, "broadcast of rank 0's parameters", e) from e


def exact_float(hexdigest: str) -> float:
    """52 bits of a hex digest as a float that holds them exactly (for ``Replicas.agree``)."""
    return float(int(hexdigest[:13], 16))


def parameter_checksum(params) -> float:
    """An exact, order-independent checksum of the parameters' bits (the sum of their 16/32-bit words,
    modulo 2^52 so that a float64 holds it exactly): equal on two ranks iff, barring a collision, the
    parameters are bit-identical; no floating-point rounding that could differ between GPUs."""
    sums = []
    for p in params:
        t = p.detach().contiguous().reshape(-1)
        words = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size(), torch.uint8))
        sums.append(words.sum(dtype=torch.int64))   # (int64 wraps around identically on every rank)
    if not sums:
        return 0.0
    return float(int(torch.stack(sums).sum().item()) % (1 << 52))   # one device sync


def is_replicated_run() -> bool:
    """True inside a torch.distributed job of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

