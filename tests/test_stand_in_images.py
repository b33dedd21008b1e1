"""bench/stand_in_images.py: a zip of random images that CelebA's reader takes as the dataset, so that the
published CelebA config's full-size steps can be timed where the data is not (issue 25 item 3)."""
import runpy
from pathlib import Path

import pytest
import torch

from dpdm_fast.data import CelebA

write_stand_in = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "stand_in_images.py"))["write_stand_in"]


def test_the_stand_in_is_read_as_a_celeba_training_set_of_random_images(tmp_path):
    path = write_stand_in(tmp_path / "stand_in.zip", count=37, resolution=32)
    data = CelebA(path, split="train", resolution=32, cache_dir=tmp_path / "cache")
    assert len(data) == 37
    image, label = data[5]
    assert image.shape == (3, 32, 32) and label == -1
    pixels = torch.stack([data[i][0] for i in range(37)])
    assert pixels.min() == -1 and pixels.max() == 1 and abs(pixels.mean()) < 0.05   # uniform on [-1, 1]
    assert not torch.equal(data[0][0], data[1][0])


def test_bad_counts_are_errors(tmp_path):
    with pytest.raises(ValueError, match="count and resolution"):
        write_stand_in(tmp_path / "x.zip", count=0)
