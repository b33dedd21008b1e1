"""A zip of random images standing in for an image dataset that is not on this machine (CelebA).

Full-size steps can then be timed and their memory measured with the published config unchanged but
``data.path``: a DP step's cost depends on the number and shape of its images, never on their pixels,
and the Poisson batches have the real dataset's expected size when the count is the real one (CelebA's
training split: 162,770 images). The samples such a run writes mean nothing.

    python bench/stand_in_images.py /tmp/celeba_stand_in.zip            # 162,770 32x32 RGB PNGs
    dpdm-fast train configs/celeba_32/train_eps_10.0.yaml data.path=/tmp/celeba_stand_in.zip ...
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_TRAIN_IMAGES = 162_770


def write_stand_in(path: Path, count: int = CELEBA_TRAIN_IMAGES, resolution: int = 32, seed: int = 0) -> Path:
    """Write ``count`` uniformly random RGB images of ``resolution`` squared pixels as PNGs into the zip ``path``."""
    if count < 1 or resolution < 1:
        raise ValueError(f"count and resolution must be >= 1, got {count} and {resolution}")
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:   # PNGs are compressed already
        for index in range(count):
            pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            archive.writestr(f"{index:06d}.png", buffer.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the zip file to write")
    parser.add_argument("--count", type=int, default=CELEBA_TRAIN_IMAGES)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    print(write_stand_in(args.out, args.count, args.resolution))


if __name__ == "__main__":
    main()
