"""fp16 underflow against the public pass size P (issue 25 review): under fp16 autocast with a fixed loss
scale S, the trainer backpropagates S * sum(per-example losses) / P, so each example's fp16 gradients carry
the factor S / P. Large passes (P up to 2,048 for the published configs on a GPU) shrink it: where do small
gradients start to underflow?

One DP step (noise off, every example clipped) of the configured network on B examples x K rows, in fp32
(the reference) and in fp16 autocast with a GradScaler(S) attached with examples_per_pass=P, for several P;
prints the relative max error of the clipped update and of the per-example norms, and the fraction of
update entries that are exactly zero (fp32 has none). The weights are the network's initialisation plus a
small perturbation (a fresh DDPM++ has zero output convs, whose gradients would hide everything else).

    python bench/fp16_underflow.py [--config CONFIG] [--device cpu|cuda] [--examples 2] [--scale 65536]
Writes bench/results/fp16_underflow_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from dpdm_fast.config import load_config
from dpdm_fast.diffusion import build_loss
from dpdm_fast.engine import DPOptimizer, PrivateModule
from dpdm_fast.generate import build_model

ROOT = Path(__file__).resolve().parents[1]
PASS_SIZES = (2, 48, 2048, 8192, 65536, 2**20)


def update(cfg, device, examples: int, clip: float, scale: float | None, pass_size: int | None):
    """The clipped update (p.grad after a noise-free SGD step at lr 0) and the per-example norms."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    with torch.no_grad():   # every parameter's gradient matters (see the module docstring)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    private = PrivateModule(model, noise_multiplicity=cfg.loss.n_noise_samples, max_grad_norm=clip,
                            backend=cfg.dp.backend)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), private.collector, noise_multiplier=0.0,
                      expected_batch_size=examples)
    scaler = None
    if scale is not None:
        scaler = torch.amp.GradScaler(device.type, init_scale=scale, growth_interval=10**9)
        opt.attach_grad_scaler(scaler, examples_per_pass=pass_size)
    data = cfg.data
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.rand(examples, data.num_channels, data.resolution, data.resolution, generator=gen, device=device) * 2 - 1
    y = torch.randint(0, data.n_classes, (examples,), generator=gen, device=device) if data.n_classes else None
    loss_fn = build_loss(**cfg.loss)
    with torch.autocast(device.type, dtype=torch.float16, enabled=scale is not None):
        losses = loss_fn(private, x, y, generator=torch.Generator(device=device).manual_seed(3)).float()
    total = losses.sum() / (pass_size or examples)
    (scaler.scale(total) if scaler is not None else total).backward()
    norms = private.collector.last_norms.clone()
    if scaler is not None:
        scaler.step(opt)
    else:
        opt.step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).float(), norms


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mnist_28/train_eps_10.0.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--scale", type=float, default=2.0**16)
    ap.add_argument("--clip", type=float, default=0.05, help="small enough that every example is clipped")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    cfg, device = load_config(ROOT / args.config), torch.device(args.device)
    start = time.perf_counter()
    reference, ref_norms = update(cfg, device, args.examples, args.clip, None, None)
    rows = []
    for P in PASS_SIZES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # (the underflow warning for S / P < 1: what is measured here)
            fp16, norms = update(cfg, device, args.examples, args.clip, args.scale, P)
        row = {"P": P, "scale_over_P": args.scale / P, "rel_update": rel(fp16, reference),
               "rel_norms": rel(norms, ref_norms), "zero_fraction": (fp16 == 0).float().mean().item()}
        rows.append(row)
        print(f"P={P:>8}  S/P={row['scale_over_P']:<9.4g} update rel err {row['rel_update']:.2e}  norms rel err "
              f"{row['rel_norms']:.2e}  zero entries {row['zero_fraction']:.3f}", flush=True)
    out = ROOT / "bench" / "results" / f"fp16_underflow_{device.type}.json"
    out.write_text(json.dumps({
        "config": args.config, "device": str(device), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "examples": args.examples, "K": cfg.loss.n_noise_samples, "scale": args.scale,
        "clip": args.clip, "fp32_norms": ref_norms.tolist(), "rows": rows,
        "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    print(f"fp32 per-example norms {[round(n, 3) for n in ref_norms.tolist()]} (all above the clip "
          f"{args.clip}); written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
