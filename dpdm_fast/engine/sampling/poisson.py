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
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, Subset, SubsetRandomSampler)
from torch.utils.data.dataloader import default_collate

from ..mechanism import batches_per_epoch


class PoissonBatchSampler(Sampler[List[int]]):
    """``steps`` batches, each example in each batch independently with probability ``sample_rate``.

    ``secure_mode``: the generator is re-seeded from ``os.urandom`` before every batch, so no
    seed in code or config predicts which examples were sampled.

    ``shard=(rank, world_size)``: one rank's part of a distributed Poisson batch. Every rank draws
    the mask over all ``num_samples`` examples and keeps those with ``index % world_size == rank``,
    so each example is still in each batch independently with probability ``sample_rate``. Ranks
    whose generators are in the same state (the same seed) draw the same mask, and the union of
    their batches is then exactly the one-process batch; independent generators (secure mode:
    each rank re-seeds from its own OS) give independent shards of masks, equally Poisson.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.num_samples, self._sample_rate, self.steps = num_samples, float(sample_rate), steps
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.shard = (int(rank), int(world))
        self.secure_mode = secure_mode
        if secure_mode and generator is None:
            generator = torch.Generator()
        self.generator = generator
        self.sink: deque | None = None   # where the next iteration reports its batch sizes

    @property
    def sample_rate(self) -> float:
        """Read-only: the accountant was given this rate when the loader was made."""
        return self._sample_rate

    @property
    def expected_batch_size(self) -> float:
        """Expected size of this rank's batches (the global expected batch is ``num_samples * sample_rate``)."""
        rank, world = self.shard
        return self.sample_rate * len(range(rank, self.num_samples, world))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        sink, self.sink = self.sink, None
        rank, world = self.shard
        for _ in range(self.steps):
            if self.secure_mode:
                self.generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            if world > 1:
                mask = mask[rank::world]    # this rank's examples: rank, rank + world, ...
            indices = mask.nonzero().reshape(-1)
            indices = (indices * world + rank if world > 1 else indices).tolist()
            if sink is not None:
                sink.append(len(indices))
            yield indices


class _Ledger:
    """Loader mixin: records the size of every batch it yields (``drawn``), for the optimizer's per-step check.

    Sizes come from the batch sampler as it hands out indices, and are matched to batches as the
    loader yields them (in order), so worker processes prefetching ahead do not shift them.
    """

    drawn: list

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


class PoissonDataLoader(_Ledger, DPDataLoader):
    """A Poisson-sampled loader (an Opacus ``DPDataLoader``, empty batches included) with a ledger."""

    def __init__(self, dataset, *, sample_rate: float, steps: int | None = None, collate_fn=None, generator=None,
                 secure_mode: bool = False, drop_last: bool = False, shard: tuple[int, int] | None = None,
                 **kwargs):
        # DPDataLoader.__init__ would build Opacus's sampler; ours records sizes and re-seeds in secure mode.
        if drop_last:
            warnings.warn("drop_last is ignored: a Poisson loader has no last partial batch", stacklevel=2)
        if kwargs.pop("distributed", False) and shard is None:   # Opacus's flag: this rank's shard
            import torch.distributed as dist
            if not dist.is_initialized():
                raise RuntimeError("distributed=True needs torch.distributed initialised first")
            shard = (dist.get_rank(), dist.get_world_size())
        if kwargs.pop("rand_on_empty", False):
            raise NotImplementedError("rand_on_empty=True is not supported: an empty batch is handled as it is")
        batch_first = kwargs.pop("batch_first", True)
        shard = shard or (0, 1)
        self.distributed = shard[1] > 1
        self.requested_batch_size: int | None = None   # the plain loader's batch_size, when made from one
        self.drawn: list[int] = []
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator, secure_mode, shard)
        first = dataset[0]
        first = first if isinstance(first, (tuple, list)) else (first,)
        collate = wrap_collate_with_empty(collate_fn=collate_fn or default_collate, batch_first=batch_first,
                                          sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
                                          dtypes=[getattr(x, "dtype", type(x)) for x in first])
        DataLoader.__init__(self, dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)

    @property
    def sample_rate(self) -> float:
        return self.batch_sampler.sample_rate

    @property
    def shard(self) -> tuple[int, int]:
        return self.batch_sampler.shard


class _RecordingBatchSampler(Sampler[List[int]]):
    """A plain loader's batch sampler, reporting each batch's size."""

    def __init__(self, inner: BatchSampler):
        self.inner, self.batch_size, self.sink = inner, inner.batch_size, None

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[List[int]]:
        sink, self.sink = self.sink, None
        for indices in self.inner:
            if sink is not None:
                sink.append(len(indices))
            yield indices


class RecordingDataLoader(_Ledger, DataLoader):
    """The loader ``make_private(poisson_sampling=False)`` returns: the same batches, with a ledger."""

    def __init__(self, data_loader: DataLoader):
        self.drawn: list[int] = []
        DataLoader.__init__(self, _base_dataset(data_loader, poisson=False),
                            batch_sampler=_RecordingBatchSampler(data_loader.batch_sampler),
                            collate_fn=data_loader.collate_fn, **_loader_options(data_loader))


def _loader_options(data_loader: DataLoader) -> dict:
    kwargs = dict(num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                  timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
                  multiprocessing_context=data_loader.multiprocessing_context,
                  persistent_workers=data_loader.persistent_workers, generator=data_loader.generator)
    if data_loader.num_workers > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
    return kwargs


def _base_dataset(data_loader: DataLoader, poisson: bool = True):
    """The examples the loader actually visits: refuse samplers Poisson sampling (or the ledger) cannot honour."""
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset (random access by index); an "
                         "IterableDataset cannot be Poisson-sampled, and the accountant assumes it is")
    dataset = data_loader.dataset
    batch_sampler = data_loader.batch_sampler
    if batch_sampler is None or type(batch_sampler) is not BatchSampler:
        raise ValueError(f"the data loader uses a custom batch_sampler ({type(batch_sampler).__name__}): the engine "
                         "cannot tell what it selects (Poisson sampling would replace it); pass a DataLoader with "
                         "batch_size=... over exactly the examples to train on (torch.utils.data.Subset for a split)")
    sampler = batch_sampler.sampler
    if isinstance(sampler, DistributedSampler):
        raise ValueError("the data loader uses a DistributedSampler: pass every rank the same plain DataLoader over "
                         "the whole dataset (batch_size = the global expected batch) with make_private("
                         "distributed=True); each rank then Poisson-samples its own shard of every batch")
    if type(sampler) is SubsetRandomSampler:
        indices = [int(i) for i in sampler.indices]
        if len(set(indices)) != len(indices):
            raise ValueError("the SubsetRandomSampler repeats indices: an example listed twice could join one batch "
                             "twice (twice the sensitivity); pass each index once")
        if poisson:
            warnings.warn(f"the data loader's SubsetRandomSampler selects {len(indices)} of {len(dataset)} examples: "
                          "Poisson sampling is done over that subset (the guarantee is for it)", stacklevel=4)
            return Subset(dataset, indices)
        return dataset
    if (type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                               and sampler._num_samples is None)) \
            and sampler.data_source is dataset:
        return dataset
    raise ValueError(f"the data loader's sampler ({type(sampler).__name__}) does not visit each example of the "
                     "loader's dataset once per epoch, so Poisson sampling over the dataset would train on other "
                     "examples than it selects: pass a DataLoader over torch.utils.data.Subset(dataset, indices) "
                     "with shuffle=True")


def make_poisson_loader(data_loader: DataLoader, secure_mode: bool = False, shard: tuple[int, int] = (0, 1),
                        public_dataset_size: int | None = None, batch_first: bool = True) -> PoissonDataLoader:
    """A Poisson loader over the same examples, with q = 1 / (batches per epoch of ``data_loader``);
    with ``public_dataset_size=N``, q = 1 / ceil(N / batch_size) from that public number instead of
    the realised size (which q would otherwise reveal). With ``shard=(rank, world_size)``, this rank's
    part of every batch (the rate and so the global expected batch do not depend on the number of
    ranks). The loader records the requested ``batch_size`` (a public number, the update's divisor
    when no public dataset size is given)."""
    if isinstance(data_loader, PoissonDataLoader):
        if secure_mode and not data_loader.batch_sampler.secure_mode:
            raise ValueError("secure_mode=True but the data loader is a Poisson loader made without it: pass the "
                             "plain DataLoader, so its sampler is re-seeded from the OS every batch")
        if data_loader.shard != tuple(shard):
            raise ValueError(f"the Poisson loader samples shard {data_loader.shard} (rank, ranks) but this process "
                             f"trains shard {tuple(shard)}: pass the plain DataLoader, it is sharded here")
        data_loader.take_drawn()   # batches drawn before this engine are not its business
        return data_loader
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if isinstance(data_loader, DPDataLoader):
        raise ValueError("pass the plain DataLoader: it is converted to a Poisson loader here")
    dataset = _base_dataset(data_loader)
    # batches per epoch of the plain loader over these examples (or over the public number of them)
    steps = batches_per_epoch(len(dataset) if public_dataset_size is None else public_dataset_size,
                              data_loader.batch_size)
    if steps == 0:
        raise ValueError("the data loader yields no batches (empty dataset?)")
    kwargs = _loader_options(data_loader)
    generator = kwargs.pop("generator")
    if secure_mode:
        generator = None   # the sampler makes its own and re-seeds it from the OS every batch
    loader = PoissonDataLoader(dataset, sample_rate=1 / steps, steps=steps, collate_fn=data_loader.collate_fn,
                               generator=generator, secure_mode=secure_mode, shard=shard, batch_first=batch_first,
                               **kwargs)
    loader.requested_batch_size = data_loader.batch_size
    return loader


def make_recording_loader(data_loader: DataLoader) -> RecordingDataLoader:
    """``poisson_sampling=False``: the same batches, with a ledger of their sizes."""
    if isinstance(data_loader, RecordingDataLoader):
        data_loader.take_drawn()
        return data_loader
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    return RecordingDataLoader(data_loader)
