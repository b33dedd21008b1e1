"""Issue 10, item 5 on a GPU: the per-group conv weight gradient and the whole DP step, kernels vs torch.

Part 1, the per-group Conv2d weight gradient at DPDM shapes (3x3, stride 1, channels 32-128,
28x28 / 14x14 / 7x7 maps, B in 64..256, K=32), each delivering (B, O, C, 3, 3) per-group gradients
into a buffer block plus each example's squared norm (what the engine needs):
  grouped   torch's grouped-convolution path (B groups), copied into the block, then the norms
  torch     whatever the torch backend's autotuner picks for the shape, then the norms
  triton    the Triton implicit-GEMM kernel (writes the block, norms in its epilogue)
  cuda      the CUDA C++ twin (when the extension builds)
Times: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before every run), the median.

Part 2, one whole training step on the DPDM MNIST net at (B, K) = (256, 32): non-private Adam, the
engine with the torch / triton / cuda backends, Opacus hooks + K-averaging, interleaved round by
round, median of the rounds (CUDA-synchronised wall time of the full step).

Usage (on a GPU machine): python bench/kernels_gpu.py [--out DIR] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

CONV_SHAPES = [(C, H) for C in (32, 64, 128) for H in (28, 14, 7)]


def conv_candidates(C: int, H: int, B: int, K: int):
    from dpdm_fast.engine.capture.rules import conv as conv_rule
    from dpdm_fast.kernels.conv_weight_grad import conv2d_weight_grad
    x = torch.randn(B * K, C, H, H, device="cuda")
    g = torch.randn(B * K, C, H, H, device="cuda")
    shape = torch.Size((C, C, 3, 3))
    block = torch.empty(B, *shape, device="cuda")
    sq = torch.zeros(B, device="cuda")
    kw = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)

    def norms():
        torch.linalg.vector_norm(block.view(B, -1), dim=1, out=sq)

    paths = conv_rule.weight_paths(x, g, shape, K, block, **kw)
    cands = {"grouped": lambda: (paths["grouped"](), norms()),
             "torch": lambda: (conv_rule.run_fastest("conv2d", conv_rule.path_key(x, g, shape, K, **kw), paths,
                                                     x.device), norms()),
             "triton": lambda: conv2d_weight_grad(x, g, K, tuple(shape), (1, 1), (1, 1), block, sq.zero_())}
    try:
        from dpdm_fast import csrc
        ext = csrc.load()
        cands["cuda"] = lambda: ext.conv2d_weight_grad(x, g, K, list(shape), [1, 1], [1, 1], block, sq.zero_())
    except RuntimeError as e:
        print(f"  cuda kernel not built: {e}")
    return cands


def bench_conv(batches, K: int) -> list[dict]:
    from triton.testing import do_bench
    rows = []
    for B in batches:
        for C, H in CONV_SHAPES:
            cands = conv_candidates(C, H, B, K)
            row = {"B": B, "K": K, "C": C, "H": H}
            for name, fn in cands.items():
                try:
                    row[name + "_ms"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
                except torch.OutOfMemoryError:
                    row[name + "_ms"] = None
                torch.cuda.empty_cache()
            if row.get("grouped_ms") and row.get("triton_ms"):
                row["grouped/triton"] = row["grouped_ms"] / row["triton_ms"]
            if row.get("torch_ms") and row.get("triton_ms"):
                row["torch/triton"] = row["torch_ms"] / row["triton_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
            del cands
            torch.cuda.empty_cache()
    return rows


def bench_steps(B: int, K: int, rounds: int) -> dict:
    from dpdm_fast.benchmarks.engines import build_engine
    engines = ["nonprivate", "dpdm_fast", "dpdm_fast_triton", "dpdm_fast_cuda", "opacus_kavg"]
    steps, times = {}, {}
    for e in engines:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps[e] = build_engine(e, "mnist", B, K, "cuda")[0]
                for _ in range(2):   # warm-up: autotuning, Triton compilation, cuDNN plans
                    steps[e]()
            torch.cuda.synchronize()
            times[e] = []
        except (RuntimeError, torch.OutOfMemoryError) as err:   # OOM or an engine that cannot run here
            print(f"  {e}: not run ({type(err).__name__}: {str(err)[:200]})")
            steps.pop(e, None)
            torch.cuda.empty_cache()
    for _ in range(rounds):   # engines interleaved round by round
        for e, step in steps.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times[e].append(time.perf_counter() - t0)
    med = {e: statistics.median(t) for e, t in times.items() if t}
    out = {"B": B, "K": K, "median_s": med}
    base = med.get("nonprivate")
    if base:
        out["vs_nonprivate"] = {e: t / base for e, t in med.items()}
    if "opacus_kavg" in med:
        out["opacus_kavg_over"] = {e: med["opacus_kavg"] / t for e, t in med.items()}
    print(json.dumps(out, indent=1), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/kernels_gpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="64,256")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_gpu.py measures GPU kernels: no CUDA GPU is visible here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    print(json.dumps(info), flush=True)
    conv = bench_conv([int(b) for b in args.batches.split(",")], 32)
    steps = bench_steps(256, 32, args.rounds)
    (out / "kernels_gpu.json").write_text(json.dumps({"machine": info, "conv": conv, "steps": steps}, indent=1))
    print(f"wrote {out / 'kernels_gpu.json'}")


if __name__ == "__main__":
    main()
