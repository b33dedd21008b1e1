"""The column tiles of the flat per-example buffer that the clip/noise pass launches over
(pure torch, shared by the Triton and CUDA backends; no Triton import)."""
from __future__ import annotations

import torch


def tile_table(numels: list[int], device: torch.device | str, tile: int) -> torch.Tensor:
    """(tiles, 4) int64 rows (offset, numel, start, index): every parameter cut into column tiles
    of ``tile`` columns (a tile never spans two parameters, whose blocks lie apart in the buffer)."""
    rows, offset = [], 0
    for i, n in enumerate(numels):
        rows += [(offset, n, s, i) for s in range(0, n, tile)]
        offset += n
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 4)
