"""A tiny real-MNIST run for training tests: a few hundred real images, a small network, few steps."""
import gzip
import struct
from pathlib import Path

import numpy as np

from dpdm_fast.config import load_config
from dpdm_fast.data import MNIST

from conftest import DATA, need

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_28" / "train_eps_10.0.yaml"


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_mnist(folder: Path, n_train: int = 200, n_test: int = 40) -> Path:
    """The first n images of real MNIST as IDX files (the reader's own format) in ``folder``."""
    if (folder / "train-images-idx3-ubyte.gz").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for train, n in ((True, n_train), (False, n_test)):
        ds = MNIST(need(DATA / "mnist"), train=train, download=False)
        stem = "train" if train else "t10k"
        _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", ds.data[:n].numpy(), 2051)
        _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", ds.targets[:n].numpy(), 2049)
    return folder


def tiny_overrides(data: Path, **extra) -> list[str]:
    """200 examples, batch 32 (q = 1/7), K = 2, 2 epochs = 14 steps, eps = 10 at delta = 1e-3."""
    values = {
        "data.path": str(data), "data.public_size": "null", "model.network.nf": 8, "model.network.ch_mult": "[1,2]",
        "model.network.num_res_blocks": 1, "model.network.attn_resolutions": "[14]",
        "train.batch_size": 32, "train.n_epochs": 2, "train.log_freq": 2, "train.snapshot_freq": 6,
        "loss.n_noise_samples": 2, "dp.delta": 1e-3, "dp.max_physical_batch_size": 12, "dp.n_splits": 1, "sampler.num_steps": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data: Path, **extra):
    return load_config(CONFIG, tiny_overrides(data, **extra))
