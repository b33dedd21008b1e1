"""Canaries: examples whose membership in the training set the audit tries to guess.

Two kinds (``mode``):

- ``gradient`` (white-box, the strongest auditor): canary j is an example whose per-example
  gradient is the fixed direction ``gain * C * e_j`` on an extra parameter vector theta (m
  coordinates, one per canary) and zero on the network. It enters as an ordinary example of the
  dataset: its per-example loss is ``<theta, gain C e_j>`` computed by a bias-free ``nn.Linear(m, 1)``
  inside the private model (so the engine's own Linear rule computes, clips and noises its
  gradient, with noise multiplicity K, physical batching and the configured backend), and its
  denoising loss is multiplied by 0. The real examples never touch theta. Score: minus the change of
  theta_j over training (an included canary pulls theta_j down by up to C per step it is sampled).
- ``input`` (black-box): canary j is an image of random +-1 pixels with a random label, trained on
  like any image. Score: how much training lowered its denoising loss (the loss under the initial
  model minus the loss under the final one, each averaged over the same fixed noise draws).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

GAIN = 10.0     # canary gradients have norm GAIN * C: always clipped, so each contributes exactly C


class AuditDataset(Dataset):
    """The real examples followed by the included canaries; items are (image, label, canary index or -1)."""

    def __init__(self, real: Dataset, canary_images: torch.Tensor, canary_labels: torch.Tensor,
                 included: torch.Tensor):
        self.real = real
        self.canary_ids = included.nonzero().reshape(-1)
        self.canary_images, self.canary_labels = canary_images, canary_labels

    def __len__(self) -> int:
        return len(self.real) + len(self.canary_ids)

    def __getitem__(self, index: int):
        if index < len(self.real):
            x, y = self.real[index]
            return x, y, -1
        j = int(self.canary_ids[index - len(self.real)])
        return self.canary_images[j], self.canary_labels[j], j


class CanaryDenoiser(nn.Module):
    """The config's denoiser plus theta (``canary``, a bias-free Linear(m, 1), zero-initialised).

    ``set_canaries(ids)`` before each forward gives the rows' canary indices (-1: a real example);
    the forward then also computes each row's canary term ``canary_term`` (0 for real rows)."""

    def __init__(self, denoiser: nn.Module, m: int, max_grad_norm: float):
        super().__init__()
        self.denoiser = denoiser
        self.canary = nn.Linear(m, 1, bias=False)
        nn.init.zeros_(self.canary.weight)
        self.scale = GAIN * max_grad_norm
        self._row_ids: torch.Tensor | None = None
        self.canary_term: torch.Tensor | None = None

    def set_canaries(self, row_ids: torch.Tensor) -> None:
        self._row_ids = row_ids

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.denoiser(x, sigma, y)
        ids = self._row_ids
        if ids is None or len(ids) != len(x):
            raise RuntimeError("set_canaries(row ids) must be called with the batch's rows before the forward")
        directions = torch.zeros(len(x), self.canary.in_features, device=x.device, dtype=x.dtype)
        rows = (ids >= 0).nonzero().reshape(-1)
        directions[rows, ids[rows]] = self.scale       # GAIN * C * e_j for canary rows, 0 for real ones
        self.canary_term = self.canary(directions).reshape(-1)
        return out


def random_images(m: int, shape: tuple, n_classes: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m images of independent +-1 pixels and random labels (0 when unconditional)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 2, (m, *shape), generator=g).float() * 2 - 1
    labels = torch.randint(0, n_classes or 1, (m,), generator=g)
    return images, labels


def with_canary_terms(losses: torch.Tensor, holder, ids: torch.Tensor, K: int) -> torch.Tensor:
    """Per-example losses with each canary's replaced by its canary term (the mean over its K rows): canaries
    train only through their term, real examples only through their loss. ``holder`` (a CanaryDenoiser or
    LayerCanaries) left ``canary_term`` in the forward; None (the layer did not run) counts as 0."""
    term = holder.canary_term
    term = losses.new_zeros(len(ids) * K) if term is None else term
    return torch.where(ids >= 0, term.reshape(len(ids), K).mean(dim=1), losses)
