"""The processes of one training run: torchrun's environment, and what the ranks must agree on.

``dpdm-fast train`` is one process, or one of several started by ``torchrun`` (or by
``dpdm-fast train --nproc-per-node N``, which starts torchrun itself with the config's ``setup.*``
keys as defaults). Every rank trains the same model on its shard of each Poisson batch (the engine
all-reduces the clipped sums, rank 0 adds the noise); rank 0 alone writes logs, checkpoints and
sample grids. After each step the ranks sum their loss statistics and whether a signal arrived,
so that all stop after the same step.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)   # a collective waits this long (a snapshot on rank 0 can take minutes on a CPU)
SHUTDOWN_TIMEOUT_S = 300          # after a signal, how long torchrun waits for the ranks' checkpoint before killing them
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run (rank 0 of 1 when not distributed)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        return cls()


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment(device: str | None) -> tuple[Ranks, str | None]:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for the CPU); returns this
    process's ranks and its device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return Ranks.current(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but this node has {torch.cuda.device_count()} GPU(s): start at "
                             "most one process per GPU (--nproc-per-node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        device = device or "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return Ranks.current(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(argv: list[str], nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str,
           master_port: int) -> int:
    """Run ``dpdm-fast train ARGV`` under torchrun (static rendezvous) and return its exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    grace = []
    # a SIGTERM / SIGINT reaches every rank; give them time to finish the step and write the checkpoint
    if "--shutdown-timeout" in parser._option_string_actions:    # (torchrun >= 2.12; before: 30 s, fixed)
        grace = [f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    args = parser.parse_args([
        f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port}", *grace,
        "-m", "dpdm_fast.cli", "train", *argv])
    try:
        run(args)
    except SignalException as e:   # torchrun passed the signal on to the ranks, which stopped cleanly
        return 130 if e.sigval == signal.SIGINT else 143
    except ChildFailedError as e:
        print(f"dpdm-fast: error: a rank failed, so the whole job stopped:\n{e.format_msg()}", file=sys.stderr)
        codes = {f.exitcode for f in e.failures.values()}
        return 143 if codes <= {143, -15} else 130 if codes <= {130, -2} else 1
    return 0


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous on one node)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_for_rank(seed: int, rank: int, *context: int) -> int:
    """An independent seed for one rank's own streams (rank 0 keeps ``seed``, so a one-process run and
    rank 0 of a distributed one draw alike)."""
    if rank == 0 and not context:
        return seed
    return int(np.random.SeedSequence([seed, rank, *context]).generate_state(1, dtype=np.uint64)[0] >> 1)


def barrier() -> None:
    dist.barrier()


def backend_name() -> str:
    return str(dist.get_backend())


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (pickled), on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def result_from_main(ranks: "Ranks", compute):
    """``compute()`` on rank 0, its result on every rank; its exception is raised on every rank (the other
    ranks must not wait at the broadcast for a rank 0 that failed). One process: just ``compute()``."""
    if not ranks.distributed:
        return compute()
    outcome = None
    if ranks.is_main:
        try:
            outcome = ("ok", compute())
        except Exception as e:   # noqa: BLE001 (whatever it is, every rank fails alike)
            outcome = ("error", e)
    kind, value = broadcast_from_main(outcome)
    if kind == "error":
        raise value
    return value


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint it read: the other nodes need no shared disk)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
