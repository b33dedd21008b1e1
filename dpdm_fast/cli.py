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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpdm-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="resolve a config and show the network and the DP noise it implies")
    info.add_argument("config", help="YAML config, e.g. configs/mnist_28/train_eps_10.0.yaml")
    info.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dpdm-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
