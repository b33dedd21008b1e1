"""Poisson sampling: what the accountant assumes."""
from __future__ import annotations

from typing import Iterator

import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, IterableDataset


class PoissonDataLoader(DPDataLoader):
    """Opacus's Poisson data loader (each example joins each batch independently with
    probability q; batches vary in size and can be empty) that also counts the batches it hands
    out, so the optimizer can check that every step consumed exactly one of them."""

    batches_drawn: int = 0

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            self.batches_drawn += 1
            yield batch


def make_poisson_loader(data_loader: DataLoader, generator: torch.Generator | None = None) -> PoissonDataLoader:
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset (random access by index); an "
                         "IterableDataset cannot be Poisson-sampled, and the accountant assumes it is")
    if isinstance(data_loader, PoissonDataLoader):
        return data_loader
    if isinstance(data_loader, DPDataLoader):
        raise ValueError("pass the plain DataLoader: it is converted to a Poisson loader here")
    if len(data_loader) == 0:
        raise ValueError("the data loader yields no batches (empty dataset?)")
    loader = PoissonDataLoader.from_data_loader(data_loader, generator=generator)
    loader.batches_drawn = 0
    return loader


