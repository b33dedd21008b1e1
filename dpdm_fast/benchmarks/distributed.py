"""``dpdm-fast bench --distributed N``: the engine on N processes against one, side by side.

N processes are spawned (gloo on the CPU, NCCL with one GPU each). Each round, engines taking
turns: rank 0 alone runs the one-process step on the whole batch of B examples (the other ranks
wait at a barrier), then all N ranks run the distributed step on their B/N examples each (strong
scaling: the global batch is what the privacy plan fixes). Reported per cell: examples/s of both,
the scaling efficiency t_1 / (N t_N), and the all-reduce twice: as it costs inside the step (which
includes waiting for the slowest rank) and alone after a barrier (pure communication of the flat
fp32 gradient). The batches are fixed-size shards here, not Poisson draws, so that every round
times the same work.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .engines import C, LR, SIGMA, WORKLOADS, make_rows, row_losses
from .measure import _sync


def _timed(device: torch.device, work) -> float:
    """Wall seconds of ``work()``, synchronised with the device on both sides."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def _step(loss, module, optimizer, rows) -> None:
    row_losses(loss, module, *rows).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _engine(net, B: int, K: int, distributed: bool):
    from ..engine import DPOptimizer, PrivateModule
    from ..engine.distributed import Replicas
    pm = PrivateModule(net, noise_multiplicity=K, max_grad_norm=C)
    opt = DPOptimizer(torch.optim.Adam(net.parameters(), lr=LR), pm.collector, noise_multiplier=SIGMA,
                      max_grad_norm=C, expected_batch_size=B, replicas=Replicas.current() if distributed else None,
                      generator=torch.Generator(next(net.parameters()).device).manual_seed(0))
    return pm, opt


class _TimedAllReduce:
    """Wraps ``Replicas.all_reduce_sum`` to record its wall time (synchronised)."""

    def __init__(self, replicas, device):
        self.inner, self.device, self.times = replicas.all_reduce_sum, device, []
        replicas.all_reduce_sum = self

    def __call__(self, flat):
        self.times.append(_timed(self.device, lambda: self.inner(flat)))


def _rank(rank: int, world: int, port: int, out: str, workload: str, grid: list, repeats: int, threads: int,
          device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dev = torch.device(f"cuda:{rank}" if device.startswith("cuda") else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    w = WORKLOADS[workload]
    cells = []
    for B, K in grid:
        if B % world:
            raise ValueError(f"B={B} is not divisible by {world} processes")
        loss, rows = make_rows(w, B, K, dev)
        shard = tuple(None if r is None else r.reshape(B, K, *r.shape[1:])[rank::world].reshape(-1, *r.shape[1:])
                      for r in rows)   # this rank's examples, each with its K rows
        torch.manual_seed(0)
        net_n = w.make_net().to(dev)
        pm_n, opt_n = _engine(net_n, B, K, distributed=True)
        timer = _TimedAllReduce(opt_n.replicas, dev)
        if rank == 0:
            torch.manual_seed(0)
            pm_1, opt_1 = _engine(w.make_net().to(dev), B, K, distributed=False)
        flat = torch.zeros(pm_n.collector.layout.size, device=dev)
        t1, tn, alone = [], [], []
        for _ in range(repeats + 1):        # round 0 warms up
            dist.barrier()
            if rank == 0:
                t1.append(_timed(dev, lambda: _step(loss, pm_1, opt_1, rows)))
            dist.barrier()
            tn.append(_timed(dev, lambda: _step(loss, pm_n, opt_n, shard)))
            dist.barrier()
            alone.append(_timed(dev, lambda: dist.all_reduce(flat)))
        step_n = torch.tensor(tn[1:], dtype=torch.float64, device=dev)   # (NCCL gathers CUDA tensors only)
        slowest = [torch.zeros_like(step_n) for _ in range(world)]
        dist.all_gather(slowest, step_n)
        step_n = torch.stack(slowest).max(0).values.cpu().tolist()    # a step ends when its slowest rank does
        if rank == 0:
            m1, mn = statistics.median(t1[1:]), statistics.median(step_n)
            # both engines took the same steps on the same examples with noise seeded alike: the same weights
            difference = max(float((a - b).detach().abs().max()) for a, b in zip(pm_1.parameters(), pm_n.parameters()))
            cells.append({"B": B, "K": K, "params": pm_n.collector.layout.size, "max_weight_difference": difference,
                          "one_process_s": m1, "distributed_s": mn,
                          "one_process_examples_per_s": B / m1, "distributed_examples_per_s": B / mn,
                          "speedup": m1 / mn, "efficiency": m1 / (world * mn),
                          "all_reduce_in_step_s": statistics.median(timer.times[1:]),
                          "all_reduce_alone_s": statistics.median(alone[1:]),
                          "flat_bytes": 4 * pm_n.collector.layout.size, "rounds": repeats})
    if rank == 0:
        torch.save(cells, Path(out) / "cells.pt")
    # Every rank past its last collective before any tears the group down: a gloo rank destroying its
    # connections while a peer's are still in use can abort that peer (seen once in CI: SIGABRT at exit).
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(world: int, workload: str, grid: list, repeats: int, threads: int, device: str) -> dict:
    """Spawn ``world`` ranks, time every (B, K) cell of ``grid``; the result dict for ``write_distributed``."""
    import tempfile

    import torch.multiprocessing as mp

    from ..training.ranks import free_port
    from .report import machine_info
    if device.startswith("cuda") and torch.cuda.device_count() < world:
        raise ValueError(f"--distributed {world} on GPUs needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, free_port(), out, workload, list(grid), repeats, threads, device),
                           nprocs=world, start_method="spawn")
        cells = torch.load(Path(out) / "cells.pt", weights_only=False)
    return {"machine": machine_info(device, threads), "processes": world,
            "backend": "nccl" if device.startswith("cuda") else "gloo", "workload": workload,
            "description": WORKLOADS[workload].description, "cells": cells}


def markdown(result: dict) -> str:
    m, n = result["machine"], result["processes"]
    where = m["gpu"] or f"{m['cpu']}, {m['threads']} thread(s) per process"
    lines = [f"# dpdm_fast on {n} processes ({result['backend']}) against one",
             "",
             f"{result['description']}; {where}; torch {m['torch']}, {m['date']}.",
             "Strong scaling: the same global batch of B examples x K rows, on one process or split over the "
             f"{n}; medians of {result['cells'][0]['rounds'] if result['cells'] else 0} interleaved rounds.",
             "",
             "| B x K | 1 process ex/s | " + f"{n} processes ex/s | speedup | efficiency | all-reduce in step | "
             "all-reduce alone | flat gradient |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        lines.append(f"| {c['B']} x {c['K']} | {c['one_process_examples_per_s']:.1f} | "
                     f"{c['distributed_examples_per_s']:.1f} | {c['speedup']:.2f}x | {100 * c['efficiency']:.0f}% | "
                     f"{1e3 * c['all_reduce_in_step_s']:.2f} ms | {1e3 * c['all_reduce_alone_s']:.2f} ms | "
                     f"{c['flat_bytes'] / 2**20:.1f} MiB |")
    lines += ["", "all-reduce in step: the flat fp32 all-reduce as timed inside the DP step (it includes waiting "
              "for the slowest rank); alone: the same all-reduce right after a barrier (communication only).",
              "Check: after the rounds, the two engines' weights differ by at most "
              f"{max((c['max_weight_difference'] for c in result['cells']), default=0):.1e} (the same steps on the "
              "same examples, noise seeded alike)."]
    return "\n".join(lines) + "\n"


def write_distributed(result: dict, out_dir: Path) -> dict:
    import json
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "distributed.json", "table": out_dir / "distributed.md"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["table"].write_text(markdown(result))
    return paths
