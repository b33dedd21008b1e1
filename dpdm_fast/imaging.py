"""Images out: model outputs in [-1, 1] to uint8 arrays, and grids of them as PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


QUANTIZE = ("truncate", "round")


def to_uint8(images: torch.Tensor, quantize: str = "truncate") -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, the layout other evaluators read.

    ``quantize="truncate"`` is DPDM's released code, ``(x / 2 + 0.5).clip(0, 1) * 255`` cast to uint8
    (rounds down); ``"round"`` rounds to the nearest level. Values outside [-1, 1] (a sampler's
    overshoot) saturate at 0 / 255, as every image writer does.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    scaled = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255)
    scaled = scaled.floor() if quantize == "truncate" else scaled.round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into rows of ``nrow`` with ``pad`` pixels of black between."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return out


def save_grid(images: np.ndarray, path: str | Path, nrow: int, scale: int = 1) -> Path:
    """Write a grid PNG of (N, H, W, C) uint8 images (grayscale when C = 1), enlarged ``scale`` times."""
    from PIL import Image

    tiled = grid(images, nrow)
    if scale > 1:
        tiled = tiled.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(tiled[..., 0] if tiled.shape[-1] == 1 else tiled)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
