"""MNIST and Fashion-MNIST from the standard IDX files (gzip or plain), without torchvision.

File names are torchvision's raw names, so a folder torchvision downloaded works as is.
"""
from __future__ import annotations

import gzip
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class CorruptDataError(ValueError):
    """A data file exists but is truncated, corrupt or inconsistent."""


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorruptDataError(f"cannot read {path}: {e}. Delete it and download it again.") from e


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file, checking its magic number and that its length matches its header."""
    raw = _read_bytes(path)
    if len(raw) < 8:
        raise CorruptDataError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise CorruptDataError(f"{path}: bad magic number {found} (expected {magic}); not an IDX "
                               "file of that kind, or corrupt")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise CorruptDataError(f"{path}: {len(raw)} bytes but its header {dims} needs {expected}; "
                               "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class IDXImageDataset(Dataset):
    """A 28x28 grayscale classification set stored as IDX files.

    ``.data`` (uint8, N x 28 x 28) and ``.targets`` (int64, N) as in torchvision; items are
    ``(image, label)`` with the image a float tensor (1, 28, 28) scaled to [-1, 1].
    """

    name = "IDX"
    items_from_arrays = ("data", "targets")   # what a dataset hash must read (dpdm_fast.engine.distributed.dataset_hash)
    folder_names: tuple[str, ...] = ()
    mirrors: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike, train: bool = True, download: bool = True):
        self.root, self.train = Path(root), train
        folder = self._find_folder()
        if folder is None:
            folder = self._download_or_fail(download)
        image_file, label_file = (self._file_in(folder, stem) for stem in SPLIT_FILES[train])
        images = read_idx(image_file, _IMAGE_MAGIC)
        labels = read_idx(label_file, _LABEL_MAGIC)
        if images.ndim != 3 or labels.ndim != 1:
            raise CorruptDataError(f"{image_file}/{label_file}: unexpected shapes {images.shape}, {labels.shape}")
        if len(images) != len(labels):
            raise CorruptDataError(f"{image_file} holds {len(images)} images but {label_file} holds "
                                   f"{len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise CorruptDataError(f"{label_file}: label {labels.max()} out of range 0..9")
        self.data = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.folder = folder

    # -- locating files -------------------------------------------------------------------
    def _candidates(self) -> list[Path]:
        out = [self.root]
        for name in self.folder_names:
            out += [self.root / name / "raw", self.root / name]
        return out + [self.cache_dir()]

    @classmethod
    def cache_dir(cls) -> Path:
        """Where a download goes when the given folder does not exist ($DPDM_FAST_CACHE, else ~/.cache/dpdm_fast)."""
        base = os.environ.get("DPDM_FAST_CACHE") or Path.home() / ".cache" / "dpdm_fast"
        return Path(base) / cls.folder_names[0]

    @staticmethod
    def _file_in(folder: Path, stem: str) -> Path:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{folder / stem}[.gz] not found")

    def _has_files(self, folder: Path) -> bool:
        stems = SPLIT_FILES[True] + SPLIT_FILES[False]
        return all((folder / s).is_file() or (folder / f"{s}.gz").is_file() for s in stems)

    def _find_folder(self) -> Path | None:
        return next((f for f in self._candidates() if self._has_files(f)), None)

    def _download_or_fail(self, download: bool) -> Path:
        expected = ", ".join(f"{s}.gz" for s in SPLIT_FILES[True] + SPLIT_FILES[False])
        searched = ", ".join(str(c) for c in self._candidates())
        problem = f"{self.name} files not found. Expected the four files {expected} in one of: {searched}."
        if not download:
            raise FileNotFoundError(problem + " Pass download=True or copy the files there.")
        # an existing folder gets the files (as torchvision does); a path that does not exist is not
        # created: the files go to the user's cache, where every later run finds them
        target = self.root / self.folder_names[0] / "raw" if self.root.is_dir() else self.cache_dir()
        errors = []
        for mirror in self.mirrors:
            try:
                target.mkdir(parents=True, exist_ok=True)
                for stem in SPLIT_FILES[True] + SPLIT_FILES[False]:
                    dest = target / f"{stem}.gz"
                    if not dest.is_file():
                        with urllib.request.urlopen(f"{mirror}{stem}.gz", timeout=20) as r:
                            data = r.read()
                        dest.with_suffix(".part").write_bytes(data)
                        dest.with_suffix(".part").rename(dest)
                return target
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{mirror}: {e}")
        raise FileNotFoundError(problem + " Downloading failed (" + "; ".join(errors) + "). Without network "
                                f"access, download the files elsewhere and copy them to {target}.")

    # -- Dataset protocol -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index].to(torch.float32).div(127.5).sub(1.0).unsqueeze(0)
        return image, int(self.targets[index])


class MNIST(IDXImageDataset):
    name = "MNIST"
    folder_names = ("MNIST", "mnist")
    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)


class FashionMNIST(IDXImageDataset):
    name = "FashionMNIST"
    folder_names = ("FashionMNIST", "fashion-mnist")
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
