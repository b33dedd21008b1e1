"""Sampling: which examples each step sees, and in which physical batches.

Owns: the Poisson batch sampler and loader with the ledger of the batch sizes it handed out
(``poisson``; the loader for ``poisson_sampling=False`` too), and ``BatchMemoryManager`` (logical
Poisson batches split into physical batches of whole examples).

May import: ``dpdm_fast.engine.mechanism`` (the public numbers q and the steps come from). Never
capture, clipping, distributed or the public API.
"""
from .batch_memory_manager import BatchMemoryManager
from .poisson import (PoissonBatchSampler, PoissonDataLoader, RecordingDataLoader, make_poisson_loader,
                      make_recording_loader)

__all__ = ["BatchMemoryManager", "PoissonBatchSampler", "PoissonDataLoader", "RecordingDataLoader",
           "make_poisson_loader", "make_recording_loader"]
