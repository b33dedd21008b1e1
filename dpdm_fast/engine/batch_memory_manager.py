"""Splitting logical (Poisson) batches into physical batches that fit in memory."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader


def _split(batch, size: int) -> list:
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        return [batch[i:i + size] for i in range(0, n, size)] or [batch]
    if isinstance(batch, (list, tuple)):
        parts = [_split(b, size) for b in batch]
        counts = {len(p) for p in parts}
        if len(counts) != 1:
            raise ValueError("all tensors of a batch must have the same number of examples")
        return [type(batch)(p[i] for p in parts) if isinstance(batch, tuple) else [p[i] for p in parts]
                for i in range(counts.pop())]
    if isinstance(batch, dict):
        keys = list(batch)
        parts = [_split(batch[k], size) for k in keys]
        return [dict(zip(keys, chunk)) for chunk in zip(*parts)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


class BatchMemoryManager:
    """Splits each logical (Poisson) batch into physical batches of at most ``max_physical_batch_size``
    examples. Each physical batch is its own forward/backward (its K rows per example stay together,
    since splitting happens before the loss expands examples into rows); clipped sums accumulate
    and noise is added once, at the step after the last physical batch of the logical batch.

    Usage mirrors Opacus::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=M, optimizer=opt) as batches:
            for x, y in batches:
                loss_fn(model, x, y).mean().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        if max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        self.data_loader, self.max_physical_batch_size, self.optimizer = data_loader, max_physical_batch_size, optimizer

    def __enter__(self) -> Iterator:
        return self._batches()

    def __exit__(self, *exc) -> None:
        self.optimizer.signal_skip_step(False)

    def __len__(self) -> int:
        expected = getattr(self.optimizer, "expected_batch_size", self.max_physical_batch_size)
        per_logical = max(1, -(-expected // self.max_physical_batch_size))
        return len(self.data_loader) * per_logical

    def _batches(self) -> Iterator:
        for logical in self.data_loader:
            chunks = _split(logical, self.max_physical_batch_size)
            for i, chunk in enumerate(chunks):
                self.optimizer.signal_skip_step(i < len(chunks) - 1)
                yield chunk
