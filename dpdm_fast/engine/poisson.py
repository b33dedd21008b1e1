"""Poisson sampling: what the accountant assumes, and a ledger of the batches actually handed out.

Each example joins each batch independently with probability q (batches vary in size and can be
empty). The loader records the size of every batch it yields, so that the optimizer can require
each step to fold in exactly the examples of one Poisson batch.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from typing import Iterator, List

import torch
from opacus.data_loader import DPDataLoader, wrap_collate_with_empty
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, Subset, SubsetRandomSampler)
from torch.utils.data.dataloader import default_collate


class PoissonBatchSampler(Sampler[List[int]]):
    """``steps`` batches, each example in each batch independently with probability ``sample_rate``.

    ``secure_mode``: the generator is re-seeded from ``os.urandom`` before every batch, so no
    seed in code or config predicts which examples were sampled.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None,
                 secure_mode: bool = False):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples, self._sample_rate, self.steps = num_samples, float(sample_rate), steps
        self.secure_mode = secure_mode
        if secure_mode and generator is None:
            generator = torch.Generator()
        self.generator = generator
        self.sink: deque | None = None   # where the next iteration reports its batch sizes

    @property
    def sample_rate(self) -> float:
        """Read-only: the accountant was given this rate when the loader was made."""
        return self._sample_rate

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        sink, self.sink = self.sink, None
        for _ in range(self.steps):
            if self.secure_mode:
                self.generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            indices = mask.nonzero().reshape(-1).tolist()
            if sink is not None:
                sink.append(len(indices))
            yield indices


class PoissonDataLoader(DPDataLoader):
    """A Poisson-sampled loader (an Opacus ``DPDataLoader``, empty batches included) that records
    the size of every batch it yields in ``drawn`` for the optimizer's per-step check."""

    def __init__(self, dataset, *, sample_rate: float, steps: int, collate_fn=None, generator=None,
                 secure_mode: bool = False, rand_on_empty: bool = False, **kwargs):
        # DPDataLoader.__init__ would build Opacus's sampler; ours records sizes and re-seeds in secure mode.
        self.distributed = False
        self.drawn: list[int] = []
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator, secure_mode)
        first = dataset[0]
        first = first if isinstance(first, (tuple, list)) else (first,)
        collate = wrap_collate_with_empty(collate_fn=collate_fn or default_collate, rand_on_empty=rand_on_empty,
                                          sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
                                          dtypes=[getattr(x, "dtype", type(x)) for x in first])
        DataLoader.__init__(self, dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)

    def __iter__(self) -> Iterator:
        sizes = deque()
        self.batch_sampler.sink = sizes
        for batch in super().__iter__():
            self.drawn.append(sizes.popleft())
            yield batch

    def take_drawn(self) -> list[int]:
        """Sizes of the batches yielded since the last call (the optimizer calls it once per step)."""
        drawn, self.drawn = self.drawn, []
        return drawn

    @property
    def sample_rate(self) -> float:
        return self.batch_sampler.sample_rate

    @property
    def batches_drawn(self) -> int:
        return len(self.drawn)


def _base_dataset(data_loader: DataLoader):
    """The dataset the loader actually samples from: refuse samplers Poisson sampling cannot honour."""
    dataset = data_loader.dataset
    batch_sampler = data_loader.batch_sampler
    if batch_sampler is None or type(batch_sampler) is not BatchSampler:
        raise ValueError(f"the data loader uses a custom batch_sampler ({type(batch_sampler).__name__}): Poisson "
                         "sampling replaces it, so whatever it selects would be lost; pass a DataLoader with "
                         "batch_size=... over exactly the examples to train on (torch.utils.data.Subset for a split)")
    sampler = batch_sampler.sampler
    if type(sampler) is SubsetRandomSampler:
        warnings.warn(f"the data loader's SubsetRandomSampler selects {len(sampler.indices)} of {len(dataset)} "
                      "examples: Poisson sampling is done over that subset (the guarantee is for it)", stacklevel=3)
        return Subset(dataset, list(sampler.indices))
    if type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                              and sampler._num_samples is None):
        return dataset
    raise ValueError(f"the data loader's sampler ({type(sampler).__name__}) does not visit each example of its dataset "
                     "once per epoch, so Poisson sampling over the dataset would train on other examples than it "
                     "selects: pass a DataLoader over torch.utils.data.Subset(dataset, indices) with shuffle=True")


def make_poisson_loader(data_loader: DataLoader, generator: torch.Generator | None = None,
                        secure_mode: bool = False, rand_on_empty: bool = False) -> PoissonDataLoader:
    """A Poisson loader over the same examples, with q = 1 / (batches per epoch of ``data_loader``)."""
    if isinstance(data_loader, PoissonDataLoader):
        return data_loader
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset (random access by index); an "
                         "IterableDataset cannot be Poisson-sampled, and the accountant assumes it is")
    if isinstance(data_loader, DPDataLoader):
        raise ValueError("pass the plain DataLoader: it is converted to a Poisson loader here")
    dataset = _base_dataset(data_loader)
    steps = -(-len(dataset) // data_loader.batch_size)  # batches per epoch of the plain loader over these examples
    if steps == 0:
        raise ValueError("the data loader yields no batches (empty dataset?)")
    kwargs = dict(num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                  timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
                  multiprocessing_context=data_loader.multiprocessing_context,
                  persistent_workers=data_loader.persistent_workers)
    if data_loader.num_workers > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
    return PoissonDataLoader(dataset, sample_rate=1 / steps, steps=steps, collate_fn=data_loader.collate_fn,
                             generator=generator if generator is not None else data_loader.generator,
                             secure_mode=secure_mode, rand_on_empty=rand_on_empty, **kwargs)
