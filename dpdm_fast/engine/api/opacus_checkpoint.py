"""Opacus's checkpoint layout: the module (plain keys), the accountant, the optimizer and schedulers."""
from __future__ import annotations

import os
import warnings
from typing import IO, BinaryIO

import torch
import torch.nn as nn
from torch.optim import Optimizer


def save_checkpoint(accountant, *, path: str | os.PathLike | BinaryIO | IO[bytes], module: nn.Module,
                    optimizer: Optimizer | None = None, noise_scheduler=None, grad_clip_scheduler=None,
                    checkpoint_dict: dict | None = None, module_state_dict_kwargs: dict | None = None,
                    torch_save_kwargs: dict | None = None) -> None:
    """Module (plain keys), accountant, optimizer and scheduler states in Opacus's checkpoint layout."""
    checkpoint = dict(checkpoint_dict or {})
    checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
    checkpoint["privacy_accountant_state_dict"] = accountant.state_dict()
    checkpoint["privacy_accountant_mechanism"] = accountant.mechanism()
    if optimizer is not None:
        checkpoint["optimizer_state_dict"] = optimizer.state_dict()
    if noise_scheduler is not None:
        checkpoint["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
    if grad_clip_scheduler is not None:
        checkpoint["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
    torch.save(checkpoint, path, **(torch_save_kwargs or {}))


def load_checkpoint(accountant, *, path: str | os.PathLike | BinaryIO | IO[bytes], module: nn.Module,
                    optimizer: Optimizer | None = None, noise_scheduler=None, grad_clip_scheduler=None,
                    module_load_dict_kwargs: dict | None = None, torch_load_kwargs: dict | None = None) -> dict:
    """Restore what ``save_checkpoint`` (ours or Opacus's) wrote; returns the checkpoint dict."""
    checkpoint = torch.load(path, **{"weights_only": False, **(torch_load_kwargs or {})})
    mechanism = checkpoint.get("privacy_accountant_mechanism", accountant.mechanism())
    if mechanism != accountant.mechanism():
        raise ValueError(f"checkpoint was accounted with {mechanism!r}, this engine uses "
                         f"{accountant.mechanism()!r}: create PrivacyEngine(accountant={mechanism!r})")
    module.load_state_dict(checkpoint["module_state_dict"], **(module_load_dict_kwargs or {}))
    accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
    for obj, key in ((optimizer, "optimizer_state_dict"), (noise_scheduler, "noise_scheduler_state_dict"),
                     (grad_clip_scheduler, "grad_clip_scheduler_state_dict")):
        state = checkpoint.pop(key, {})
        if obj is not None and state:
            obj.load_state_dict(state)
        elif (obj is not None) != bool(state):
            warnings.warn(f"{key} has {len(state)} items but the {key.rsplit('_state', 1)[0]} is "
                          f"{'' if obj is not None else 'not '}provided", stacklevel=3)
    return checkpoint
