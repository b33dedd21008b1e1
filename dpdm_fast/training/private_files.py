"""WORKDIR/private/: what a run writes that depends on the private data without the accountant's noise.

A run's workdir splits in two (README: "What a run writes, and what is safe to share"):
- shareable (in secure mode): ``checkpoint.pt``, ``checkpoints/``, ``samples/``, ``metrics.jsonl``
  (step, epoch, eps, learning rate: functions of the public plan and the step count only);
- ``private/``, which stays on the data's machine: ``diagnostics.jsonl`` and ``curves.png`` (the
  training loss, gradient norms, clipped fraction and batch sizes of the private batches, none of
  them noised), ``data_key``, the key of the data check that checkpoints carry, ``resume_state.pt``
  (what a resume needs that depends on the private batch sizes: the engine's autotune choices, keyed
  by bucketed physical batch sizes, and each rank's loss and torch generator states, which advance
  with every physical batch and every example), and ``released_step`` (the last step whose output
  was released: a resume from an older checkpoint would draw released steps again).

The data check: a resume must refuse other data at the same path, so the checkpoint holds a hash of
the training set; unkeyed, that hash tells a reader which of two candidate datasets was used (eps is
infinite for the file). Keyed with a random key that only ``private/data_key`` holds, it is a
pseudorandom value to anyone without the key.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from .. import checkpoint as ckpt
from ..engine.distributed import dataset_fingerprint

PRIVATE = "private"
DATA_KEY = "data_key"
RESUME_STATE = "resume_state.pt"
RELEASED = "released_step"


class MissingDataKey(ckpt.CheckpointError):
    """The run's data key is gone: the data a checkpoint was trained on cannot be checked."""


def private_dir(workdir: str | Path) -> Path:
    """WORKDIR/private, created readable by its owner only."""
    folder = Path(workdir) / PRIVATE
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def data_key(workdir: str | Path, create: bool) -> bytes:
    """The run's random data-check key (32 bytes), made on the run's first start (``create``)."""
    path = Path(workdir) / PRIVATE / DATA_KEY
    if path.is_file():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise MissingDataKey(f"{path} is not a data key (64 hex digits): restore it from a copy of the run's "
                                 "private/ folder")
        return key
    if not create:
        raise MissingDataKey(f"{path} is missing: it is the key that checks the training data against the checkpoint "
                             "(it stays on the data's machine, see the README). Copy the run's private/ folder back "
                             "beside its checkpoint to resume; without it the run cannot be resumed")
    key = secrets.token_bytes(32)
    private_dir(workdir)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def data_check(dataset, key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the dataset's size and every example, in order."""
    return dataset_fingerprint(dataset, key=key)


def write_resume_state(workdir: str | Path, step: int, state: dict) -> None:
    """The private part of the checkpoint of ``step`` (written just before the checkpoint itself)."""
    ckpt.save_atomic({"step": step, **state}, private_dir(workdir) / RESUME_STATE)


def read_resume_state(workdir: str | Path, step: int) -> tuple[dict | None, str | None]:
    """The private part of the checkpoint of ``step``, or (None, why not): a missing, unreadable or other
    step's file only costs exactness (the streams are then re-derived from the seed), never the run."""
    path = Path(workdir) / PRIVATE / RESUME_STATE
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError:
        return None, f"{path} is not readable"
    if state.get("step") != step:
        return None, f"{path} is of step {state.get('step')}, the checkpoint of step {step}"
    return state, None


def mark_released(workdir: str | Path, step: int) -> None:
    """Record that the output of ``step`` (its checkpoint, grid) has been released."""
    path = private_dir(workdir) / RELEASED
    tmp = path.with_name(f".{RELEASED}.tmp")
    tmp.write_text(f"{step}\n")
    os.replace(tmp, path)


def released_step(workdir: str | Path) -> int:
    """The last released step (0 when nothing was released, or for a workdir of an older version)."""
    path = Path(workdir) / PRIVATE / RELEASED
    return int(path.read_text().strip()) if path.is_file() else 0
