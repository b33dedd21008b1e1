"""The configured torch optimizer (optim.optimizer, optim.params), which the DP engine wraps."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    name = cfg.optim.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer={name!r}: choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=cfg.optim.params.lr, weight_decay=cfg.optim.params.weight_decay)
