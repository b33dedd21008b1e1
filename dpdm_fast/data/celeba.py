"""CelebA (or any folder / zip of face images), center-cropped and resized with PIL.

As DPDM prepared CelebA (the StyleGAN dataset tool, ``--transform=center-crop``): the largest
central square, resized with LANCZOS, no flips. ``resample="bicubic"`` keeps this package's earlier
choice. Decoding 200k JPEGs every epoch would dominate a small DP run, so the preprocessed images
are cached once as a single uint8 array (N, H, W, 3) keyed by the source files, split,
resolution, crop and resampling; later runs memory-map it.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = {"train": 0, "valid": 1, "test": 2}


RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


def center_crop_resize(image: Image.Image, resolution: int, crop: int | None = None,
                       resample: str = "lanczos") -> np.ndarray:
    """Crop the central ``crop`` x ``crop`` square (default: the largest square, rows and columns from
    (size - crop) // 2, as the StyleGAN dataset tool) and resize with ``resample`` ('lanczos', the
    tool's and DPDM's; 'bicubic')."""
    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {resample!r}")
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h) if crop is None else crop
    if side > min(w, h):
        raise ValueError(f"crop {side} is larger than the image ({w}x{h})")
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), RESAMPLING[resample], reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


class _Source:
    """Lists and opens the images of a folder or a zip file, in sorted name order."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file() and zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            self.names = sorted(n for n in self.zip.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        elif path.is_dir():
            self.zip = None
            self.names = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise FileNotFoundError(f"{path} is neither an image folder nor a zip file of images")

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for name in self.names:
            size = self.zip.getinfo(name).file_size if self.zip else (self.path / name).stat().st_size
            digest.update(f"{name}:{size};".encode())
        return digest.hexdigest()[:16]

    def open(self, name: str) -> Image.Image:
        try:
            if self.zip:
                return Image.open(io.BytesIO(self.zip.read(name)))
            return Image.open(self.path / name)
        except (UnidentifiedImageError, OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot decode image {name} in {self.path}: {e}") from e


def _split_filter(root: Path, split: str) -> Callable[[str], bool]:
    """Select names by ``list_eval_partition.txt`` when it exists (official CelebA splits)."""
    if split == "all":
        return lambda name: True
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS) + ['all']}, got {split!r}")
    for candidate in (root / "list_eval_partition.txt", root.parent / "list_eval_partition.txt"):
        if candidate.is_file():
            wanted = set()
            for line_no, line in enumerate(candidate.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise ValueError(f"{candidate}:{line_no}: expected '<file> <0|1|2>', got {line!r}")
                if int(parts[1]) == SPLITS[split]:
                    wanted.add(parts[0])
            return lambda name: Path(name).name in wanted
    if split != "train":
        raise FileNotFoundError(f"split={split!r} needs list_eval_partition.txt beside {root}")
    return lambda name: True  # a plain folder: all of it is training data


class CelebA(Dataset):
    """Face images as (3, resolution, resolution) float tensors in [-1, 1].

    ``root`` is the official ``img_align_celeba/`` folder (splits from ``list_eval_partition.txt``
    beside or inside it), a folder containing it, any folder of images, or a zip file of images.
    Items are ``(image, -1)``: CelebA is used unconditionally and -1 means 'no label'.
    """

    items_from_arrays = ("data",)   # what a dataset hash must read (dpdm_fast.engine.distributed.dataset_hash)

    def __init__(self, root: str | os.PathLike, split: str = "train", resolution: int = 32,
                 crop: int | None = None, cache_dir: str | os.PathLike | None = None, resample: str = "lanczos"):
        root = Path(root)
        if (root / "img_align_celeba").is_dir():
            root = root / "img_align_celeba"
        source = _Source(root)
        keep = _split_filter(root if root.is_dir() else root.parent, split)
        names = [n for n in source.names if keep(n)]
        if not names:
            raise FileNotFoundError(f"no images for split {split!r} under {root}")
        source.names = names
        if resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {resample!r}")
        key = f"{source.fingerprint()}-{split}-{resolution}-{crop}-{resample}"
        cache_dir = Path(cache_dir) if cache_dir else (root.parent if root.is_file() else root) / ".dpdm_fast_cache"
        cache = cache_dir / f"celeba-{key}.npy"
        if not cache.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            array = np.stack([center_crop_resize(source.open(n), resolution, crop, resample) for n in _progress(names)])
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, array)
            tmp.rename(cache)
        self.data = np.load(cache, mmap_mode="r")
        self.names, self.resolution, self.cache_file, self.resample = names, resolution, cache, resample

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.data[index])).permute(2, 0, 1)
        return image.to(torch.float32).div(127.5).sub(1.0), -1


def _progress(names: list[str]) -> Iterator[str]:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iter(names)
    return iter(tqdm(names, desc="preprocessing images (cached afterwards)", disable=len(names) < 1000))
