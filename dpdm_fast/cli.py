"""Command line: ``dpdm-fast <command> ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

KNOWN_DATASET_SIZES = {"mnist_28": 60000, "fmnist_28": 60000, "celeba_32": 162770, "celeba_64": 162770}


def cmd_info(args: argparse.Namespace) -> int:
    """Show the resolved config, the network size and the DP noise it implies."""
    from omegaconf import OmegaConf

    from .config import load_config
    from .models import build_network

    cfg = load_config(args.config, args.overrides)
    print(OmegaConf.to_yaml(cfg))
    net = build_network(cfg.model.network)
    print(f"network: NCSNpp, {sum(p.numel() for p in net.parameters()):,} parameters")
    n = KNOWN_DATASET_SIZES.get(cfg.data.name)
    if n is None:
        print("dataset size unknown: noise multiplier not computed")
        return 0
    from opacus.accountants.utils import get_noise_multiplier

    q = cfg.train.batch_size / n
    steps = int(cfg.train.n_epochs / q)
    sigma = get_noise_multiplier(target_epsilon=cfg.dp.epsilon, target_delta=cfg.dp.delta,
                                 sample_rate=q, steps=steps, accountant=cfg.dp.accountant)
    print(f"DP: q={q:.5f}, {steps} steps, target eps={cfg.dp.epsilon} at delta={cfg.dp.delta} -> "
          f"noise multiplier {sigma:.4f} ({cfg.dp.accountant} accountant, Opacus)")
    return 0


def _grid(text: str) -> list[tuple[int, int]]:
    if text == "full":
        from .benchmarks.runner import FULL_GRID
        return FULL_GRID
    try:
        return [tuple(int(v) for v in cell.split("x")) for cell in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 8x4,16x8 (B x K) or be 'full', got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    """Time and memory of every DP engine on the DPDM networks, side by side."""
    import warnings
    from pathlib import Path

    from .benchmarks import ENGINES, WORKLOADS
    from .benchmarks.report import write_outputs
    from .benchmarks.runner import CPU_QUICK_GRID, GPU_GRID, run_grid

    warnings.filterwarnings("ignore")
    engines = args.engines.split(",")
    workloads = args.workloads.split(",")
    for name, known in [(engines, ENGINES), (workloads, WORKLOADS)]:
        bad = [n for n in name if n not in known]
        if bad:
            raise ValueError(f"unknown {bad}; choose from {sorted(known)}")
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch build sees no CUDA device")
    grid = args.grid or (GPU_GRID if args.device.startswith("cuda") else CPU_QUICK_GRID)
    result = run_grid(engines, workloads, grid, repeats=args.repeats, device=args.device, threads=args.threads,
                      memory=not args.no_memory, isolate=args.isolate, max_step_s=args.max_step_s,
                      max_rows=args.max_rows)
    paths = write_outputs(result, Path(args.out))
    print(paths["table"].read_text())
    print(f"wrote {paths['json']}, {paths['table']}" + (f", {paths['plot']}" if paths["plot"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpdm-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="resolve a config and show the network and the DP noise it implies")
    info.add_argument("config", help="YAML config, e.g. configs/mnist_28/train_eps_10.0.yaml")
    info.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark every DP engine side by side (quick CPU grid by default)")
    bench.add_argument("--engines", default="nonprivate,dpdm_fast,opacus_kavg,opacus_ghost,functorch")
    bench.add_argument("--workloads", default="mnist", help="comma list of: mnist, small, celeba")
    bench.add_argument("--grid", type=_grid, default=None,
                       help="cells as BxK, e.g. 8x4,16x8,32x4, or 'full' (B in 16,64,256,1024 x K in 1,2,8,32)")
    bench.add_argument("--max-step-s", type=float, default=None,
                       help="do not run an engine on a cell whose step would take longer (extrapolated from "
                            "its smaller cells); such cells are reported as too slow")
    bench.add_argument("--max-rows", type=int, default=None,
                       help="do not run cells with more rows (B x K) than this; reported as too slow")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    bench.add_argument("--isolate", action="store_true",
                       help="time each engine alone in fresh processes (one per step, engines taking turns) "
                            "instead of interleaved in one process")
    bench.add_argument("--out", default="bench/out", help="folder for results.json, results.md, results.png")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"dpdm-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
