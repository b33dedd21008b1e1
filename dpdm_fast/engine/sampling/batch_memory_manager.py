"""Splitting logical (Poisson) batches into physical batches that fit in memory.

As in Opacus, the *indices* of each logical batch are split, so every batch type a collate
function produces works (tuples, dicts, namedtuples, non-tensor fields), and the split loader has
``len()``. Unlike Opacus, which tells the optimizer from inside the sampler (wrong once worker
processes prefetch ahead), the bookkeeping happens as each physical batch is handed to the user.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterator, List

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .poisson import PoissonBatchSampler, _loader_options


class BatchSplittingSampler(Sampler[List[int]]):
    """Each logical batch's indices in chunks of at most ``max_batch_size`` (an empty batch stays one
    empty chunk, which must still be stepped: its noise is part of the mechanism)."""

    def __init__(self, sampler, max_batch_size: int):
        self.sampler, self.max_batch_size = sampler, max_batch_size
        self.sink: deque | None = None   # (logical size, first chunk?, last chunk?) per chunk of the next iteration

    def __iter__(self) -> Iterator[List[int]]:
        sink, self.sink = self.sink, None
        for indices in self.sampler:
            chunks = [list(indices)] if len(indices) == 0 else \
                [c.tolist() for c in np.array_split(indices, math.ceil(len(indices) / self.max_batch_size))]
            for i, chunk in enumerate(chunks):
                if sink is not None:
                    sink.append((len(indices), i == 0, i == len(chunks) - 1))
                yield chunk

    def __len__(self) -> int:
        if isinstance(self.sampler, BatchSampler):
            per_batch = self.sampler.batch_size
        elif isinstance(self.sampler, PoissonBatchSampler):
            per_batch = self.sampler.expected_batch_size
        else:
            per_batch = getattr(self.sampler, "batch_size", self.max_batch_size)
        return max(len(self.sampler), math.ceil(len(self.sampler) * per_batch / self.max_batch_size))


class _PhysicalBatches(DataLoader):
    """The loader BatchMemoryManager yields: signals the optimizer and the Poisson ledger per batch."""

    def __init__(self, source: DataLoader, max_batch_size: int, optimizer):
        super().__init__(source.dataset, batch_sampler=BatchSplittingSampler(source.batch_sampler, max_batch_size),
                         collate_fn=source.collate_fn, **_loader_options(source))
        self.source, self.optimizer = source, optimizer

    def __iter__(self) -> Iterator:
        info = deque()
        self.batch_sampler.sink = info
        for batch in super().__iter__():
            logical, first, last = info.popleft()
            if first and hasattr(self.source, "drawn"):
                self.source.drawn.append(logical)   # one logical batch, consumed over its physical batches
            self.optimizer.signal_skip_step(not last)
            yield batch


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
        if not isinstance(data_loader, DataLoader) or data_loader.batch_sampler is None:
            raise TypeError("BatchMemoryManager splits the index batches of a torch DataLoader (the one "
                            f"make_private returned); got {type(data_loader).__name__}")
        self.data_loader, self.max_physical_batch_size, self.optimizer = data_loader, max_physical_batch_size, optimizer

    def __enter__(self) -> DataLoader:
        return _PhysicalBatches(self.data_loader, self.max_physical_batch_size, self.optimizer)

    def __exit__(self, *exc) -> None:
        self.optimizer.signal_skip_step(False)
