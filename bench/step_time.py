"""One training step (forward, backward, clip, noise, Adam) of the DPDM MNIST network, side by side.

Engines, all on the same model and batch, measured interleaved in one run:
  nonprivate   plain Adam step on the mean loss (the floor)
  dpdm_fast    this engine (one gradient per example, sum over K inside the GEMM)
  opacus_kavg  Opacus 1.6 'hooks' per-row gradients, averaged over each example's K rows, clipped
               (what DPDM ran, through a fork of Opacus)

Usage: python bench/step_time.py [--batch 16] [--k 8] [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import warnings

import torch

from dpdm_fast.diffusion import EDMDenoiser, EDMLoss
from dpdm_fast.engine import DPOptimizer, PrivateModule
from dpdm_fast.models import NCSNpp

warnings.filterwarnings("ignore")


def make_rows(B, K, seed=0):
    loss = EDMLoss(n_noise_samples=K, n_classes=10)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=g)
    return loss, loss.make_rows(x, y, g)


def row_losses(loss, model, clean, sigma, noise, y):
    pred = EDMDenoiser(model)(clean + sigma * noise, sigma, y)
    return (loss.weight(sigma) * (pred - clean) ** 2).reshape(clean.shape[0], -1).mean(1)


def nonprivate_step(net, opt, loss, rows):
    row_losses(loss, net, *rows).mean().backward()
    opt.step()
    opt.zero_grad()


def make_dpdm_fast(net, B, K):
    pm = PrivateModule(net, noise_multiplicity=K, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.Adam(net.parameters(), lr=1e-4), pm.collector, noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=B, generator=torch.Generator().manual_seed(0))

    def step(loss, rows):
        row_losses(loss, pm, *rows).mean().backward()
        opt.step()
        opt.zero_grad()
    return step, pm


def make_opacus_kavg(net, B, K):
    from opacus import GradSampleModule
    gsm = GradSampleModule(net, loss_reduction="mean")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(loss, rows):
        row_losses(loss, gsm, *rows).mean().backward()
        N = rows[0].shape[0]
        per_ex = [p.grad_sample.reshape(N // K, K, -1).mean(1) for p in params]
        norms = torch.stack([g.norm(dim=1) for g in per_ex], 1).norm(dim=1)
        f = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for p, g in zip(params, per_ex):
            p.grad = ((f @ g) + torch.randn(g.shape[1], generator=gen)).view_as(p) / B
            p.grad_sample = None
        opt.step()
        opt.zero_grad()
    return step, gsm


def timed(fn, *args):
    gc.collect()
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--engines", default="nonprivate,dpdm_fast,opacus_kavg")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    B, K = a.batch, a.k
    loss, rows = make_rows(B, K)
    engines = {}
    for name in a.engines.split(","):
        torch.manual_seed(0)
        net = NCSNpp(28, [7])
        if name == "nonprivate":
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            engines[name] = lambda l, r, net=net, opt=opt: nonprivate_step(net, opt, l, r)
        elif name == "dpdm_fast":
            engines[name] = make_dpdm_fast(net, B, K)[0]
        elif name == "opacus_kavg":
            engines[name] = make_opacus_kavg(net, B, K)[0]
    times = {n: [] for n in engines}
    for n, fn in engines.items():  # warm-up
        timed(fn, loss, rows)
    for _ in range(a.repeats):  # interleaved so machine noise hits every engine alike
        for n, fn in engines.items():
            times[n].append(timed(fn, loss, rows))
    print(f"DPDM MNIST net (1.75M params), B={B}, K={K}, {a.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    base = statistics.median(times["nonprivate"]) if "nonprivate" in times else None
    for n, ts in times.items():
        med = statistics.median(ts)
        extra = f"  {med / base:5.2f}x non-private" if base else ""
        print(f"{n:12s} median {med * 1e3:8.1f} ms  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}){extra}")
    if "dpdm_fast" in times and "opacus_kavg" in times:
        print(f"dpdm_fast speed-up over opacus_kavg: "
              f"{statistics.median(times['opacus_kavg']) / statistics.median(times['dpdm_fast']):.2f}x")


if __name__ == "__main__":
    main()
