"""A hash over every example of a map-style dataset, in order, read in a stream.

Two uses, both about *which* examples are trained on, never released as they are:
- the ranks of a distributed run compare it (ranks shard by position, so an example held at two
  positions, or two different lists of files, could put one example in two shards: twice the
  sensitivity the accountant counts);
- keyed (HMAC-SHA256, ``key=``), the trainer writes it into checkpoints to refuse a resume on other
  data: without the key, which never leaves the data's machine, the keyed hash says nothing about
  the data (an unkeyed hash would tell a reader of the checkpoint which of two candidate datasets
  was used).

Every example is hashed: a dataset whose items are a function of array attributes only declares
them (``items_from_arrays = ("data", "targets")``, as dpdm_fast's own datasets do) and its arrays
are read in chunks; any other dataset is read item by item, with torch's, numpy's and Python's
generators seeded alike so that random transforms agree between ranks.
"""
from __future__ import annotations

import hashlib
import hmac
import random

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

CHUNK_BYTES = 1 << 24   # bytes of an array hashed at a time


def dataset_fingerprint(dataset, key: bytes | None = None) -> str:
    """Hex digest over the dataset's size and every example in order (HMAC-SHA256 with ``key``)."""
    digest = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    digest.update(f"{len(dataset)}".encode())
    _hash_dataset(digest, dataset)
    return digest.hexdigest()


def _hash_dataset(digest, dataset) -> None:
    if isinstance(dataset, Subset):
        digest.update(b"subset" + np.asarray(dataset.indices, dtype=np.int64).tobytes())
        _hash_dataset(digest, dataset.dataset)
        return
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            _hash_array(digest, t)
        return
    declared = getattr(type(dataset), "items_from_arrays", None)
    if declared:
        for name in declared:
            _hash_array(digest, getattr(dataset, name))
        return
    _hash_items(digest, dataset)


def _hash_items(digest, dataset) -> None:
    """Every item, in order, under fixed seeds (random transforms then draw alike on every rank)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)   # (the CPU generator only: CUDA's are left as they are)
            random.seed(0)
            np.random.seed(0)
            for i in range(len(dataset)):
                digest.update(f"item {i}".encode())
                _hash_item(digest, dataset[i])
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _hash_array(digest, array) -> None:
    """dtype, shape, then the bytes in chunks (a memory-mapped array is never loaded whole)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous()
        digest.update(str((array.dtype, tuple(array.shape))).encode())
        flat = array.reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), CHUNK_BYTES):
            digest.update(flat[start:start + CHUNK_BYTES].numpy().tobytes())
        return
    array = np.asarray(array)
    digest.update(str((array.dtype, array.shape)).encode())
    flat = array.reshape(-1)   # a view for C-contiguous (e.g. memory-mapped) arrays
    step = max(1, CHUNK_BYTES // max(array.itemsize, 1))
    for start in range(0, flat.size, step):
        digest.update(np.ascontiguousarray(flat[start:start + step]).tobytes())


def _hash_item(digest, item) -> None:
    if isinstance(item, (torch.Tensor, np.ndarray)):
        _hash_array(digest, item)
    elif isinstance(item, (tuple, list)):
        for x in item:
            _hash_item(digest, x)
    elif isinstance(item, dict):
        for key in sorted(item, key=str):
            digest.update(str(key).encode())
            _hash_item(digest, item[key])
    elif hasattr(item, "tobytes"):   # PIL images
        digest.update(item.tobytes())
    else:
        digest.update(repr(item).encode())
