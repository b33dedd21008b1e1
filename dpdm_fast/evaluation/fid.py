"""FID of uint8 samples against a dataset's training set, with the reference statistics cached.

Images go to the feature network as uint8 (N, 3, H, W): grayscale repeated to 3 channels, no
resizing here (torch-fidelity's Inception resizes to 299 itself, as TensorFlow's FID did).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .frechet import frechet_distance, statistics


def to_network_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, 3, H, W), one channel repeated to three."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, H, W, 1 or 3) images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


@torch.no_grad()
def features(images: np.ndarray, network: Callable[[torch.Tensor], torch.Tensor], batch: int = 200,
             device: str | torch.device = "cpu", progress: bool = True, desc: str = "features") -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
        out.append(network(to_network_input(images[i:i + batch]).to(device)).double().cpu().numpy())
    return np.concatenate(out)


def reference_key(dataset: str, real_images: np.ndarray, network_name: str, weights: str | Path | None = None) -> str:
    """Cache key of a dataset's reference statistics: the dataset, the network (and its weights file's
    name and size), and a hash of the very images the statistics are computed from."""
    h = hashlib.sha256(np.ascontiguousarray(real_images).data)
    ident = [dataset, network_name, list(real_images.shape)]
    if weights is not None:
        ident += [Path(weights).name, Path(weights).stat().st_size]
    h.update(json.dumps(ident).encode())
    return f"{dataset}-{network_name}-{h.hexdigest()[:16]}"


def reference_statistics(dataset: str, real_images: np.ndarray, network: Callable, network_name: str,
                         cache_dir: str | Path, weights: str | Path | None = None, **kw) -> tuple:
    """(mu, sigma, cache file, computed now?) of the real images' features, from the cache when there."""
    cache = Path(cache_dir) / f"fid-stats-{reference_key(dataset, real_images, network_name, weights)}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["mu"], f["sigma"], cache, False
    mu, sigma = statistics(features(real_images, network, desc="reference features", **kw))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    tmp.rename(cache)
    return mu, sigma, cache, True


def fid(samples: np.ndarray, reference: tuple[np.ndarray, np.ndarray], network: Callable, **kw) -> float:
    mu, sigma = statistics(features(samples, network, desc="sample features", **kw))
    return frechet_distance(mu, sigma, *reference)
