import gzip
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, need
from dpdm_fast.data import MNIST, CelebA, CorruptDataError, FashionMNIST, build_dataset, center_crop_resize

MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mnist_train_real_counts_and_mean():
    ds = MNIST(need(DATA / "mnist"), train=True, download=False)
    assert len(ds) == 60000 and ds.data.shape == (60000, 28, 28) and ds.data.dtype == torch.uint8
    assert ds.targets.dtype == torch.int64
    assert ds.targets.bincount().tolist() == MNIST_COUNTS
    assert abs(ds.data.float().mean().item() - 33.318) < 1e-3
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 5
    assert image.min() >= -1 and image.max() <= 1 and image.min() == -1


def test_fashion_mnist_real_counts_from_parent_folder():
    train = FashionMNIST(need(DATA), train=True, download=False)  # finds DATA/fashion-mnist
    test = FashionMNIST(DATA, train=False, download=False)
    assert train.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert abs(train.data.float().mean().item() - 72.94) < 0.01


def copy_mnist(tmp_path, gunzip=False):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in need(DATA / "mnist").iterdir():
        if gunzip:
            with gzip.open(f) as src:
                (folder / f.name[:-3]).write_bytes(src.read())
        else:
            shutil.copy(f, folder / f.name)
    return folder


def test_plain_idx_files(tmp_path):
    ds = MNIST(copy_mnist(tmp_path, gunzip=True), train=False, download=False)
    assert len(ds) == 10000


def test_missing_files_error_names_files_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        MNIST(tmp_path, download=False)
    msg = str(e.value)
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz", str(tmp_path)]:
        assert name in msg


def _write_gz(path, data):
    with gzip.open(path, "wb") as f:
        f.write(data)


def test_truncated_file_is_an_error(tmp_path):
    folder = copy_mnist(tmp_path, gunzip=True)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptDataError, match="truncated"):
        MNIST(folder, train=False, download=False)


def test_bad_magic_is_an_error(tmp_path):
    folder = copy_mnist(tmp_path)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        raw = bytearray(f.read())
    raw[:4] = struct.pack(">I", 2051)
    _write_gz(folder / "t10k-labels-idx1-ubyte.gz", bytes(raw))
    with pytest.raises(CorruptDataError, match="magic"):
        MNIST(folder, train=False, download=False)


def test_label_image_count_mismatch_is_an_error(tmp_path):
    folder = copy_mnist(tmp_path)
    labels = struct.pack(">II", 2049, 9999) + bytes(9999)
    _write_gz(folder / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(CorruptDataError, match="10000 images but .* 9999 labels"):
        MNIST(folder, train=False, download=False)


def test_corrupt_gzip_is_an_error(tmp_path):
    folder = copy_mnist(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CorruptDataError, match="cannot read"):
        MNIST(folder, train=False, download=False)


def make_faces(folder, n, size=(40, 50)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i + 1:06d}.jpg")


def test_celeba_official_layout_with_partition(tmp_path):
    make_faces(tmp_path / "img_align_celeba", 6)
    (tmp_path / "list_eval_partition.txt").write_text(
        "\n".join(f"{i + 1:06d}.jpg {s}" for i, s in enumerate([0, 0, 0, 1, 2, 2])) + "\n")
    train = CelebA(tmp_path, split="train", resolution=32, cache_dir=tmp_path / "cache")
    test = CelebA(tmp_path, split="test", resolution=32, cache_dir=tmp_path / "cache")
    assert len(train) == 3 and len(test) == 2
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == -1 and -1 <= image.min() and image.max() <= 1
    assert train.data.dtype == np.uint8 and train.data.shape == (3, 32, 32, 3)


def test_celeba_cache_is_reused_and_keyed(tmp_path):
    make_faces(tmp_path / "faces", 3)
    a = CelebA(tmp_path / "faces", resolution=32, cache_dir=tmp_path / "c")
    stamp = a.cache_file.stat().st_mtime_ns
    b = CelebA(tmp_path / "faces", resolution=32, cache_dir=tmp_path / "c")
    assert b.cache_file == a.cache_file and b.cache_file.stat().st_mtime_ns == stamp
    c = CelebA(tmp_path / "faces", resolution=64, cache_dir=tmp_path / "c")
    assert c.cache_file != a.cache_file and c[0][0].shape == (3, 64, 64)
    make_faces(tmp_path / "faces" / "more", 1)  # new files: a new cache, never a stale one
    assert len(CelebA(tmp_path / "faces", resolution=32, cache_dir=tmp_path / "c")) == 4


def test_celeba_from_zip(tmp_path):
    make_faces(tmp_path / "faces", 2)
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as z:
        for p in sorted((tmp_path / "faces").iterdir()):
            z.write(p, f"img/{p.name}")
    ds = CelebA(tmp_path / "faces.zip", resolution=32, cache_dir=tmp_path / "c")
    assert len(ds) == 2
    direct = center_crop_resize(Image.open(tmp_path / "faces" / "000001.jpg"), 32)
    assert np.array_equal(np.asarray(ds.data[0]), direct)


def test_celeba_bad_image_is_an_error(tmp_path):
    make_faces(tmp_path / "faces", 1)
    (tmp_path / "faces" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        CelebA(tmp_path / "faces", cache_dir=tmp_path / "c")


def test_celeba_is_resized_with_lanczos_as_the_stylegan_dataset_tool(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)          # CelebA's aligned size
    image = Image.fromarray(array)
    ours = center_crop_resize(image, 32)
    crop = array[(218 - 178) // 2:(218 + 178) // 2, :]                      # the tool's centre crop
    tool = np.asarray(Image.fromarray(crop).resize((32, 32), Image.LANCZOS))
    assert np.array_equal(ours, tool)
    assert not np.array_equal(ours, center_crop_resize(image, 32, resample="bicubic"))
    with pytest.raises(ValueError, match="resample"):
        center_crop_resize(image, 32, resample="nearest")
    make_faces(tmp_path / "faces", 1)
    lanczos = CelebA(tmp_path / "faces", resolution=32, cache_dir=tmp_path / "c")
    bicubic = CelebA(tmp_path / "faces", resolution=32, cache_dir=tmp_path / "c", resample="bicubic")
    assert lanczos.cache_file != bicubic.cache_file                         # the cache key has the resampling


def test_center_crop_takes_the_middle():
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:, 10:50] = 255  # the central 40x40 square is white, the borders black
    out = center_crop_resize(Image.fromarray(array), 8)
    assert out.shape == (8, 8, 3) and out.min() > 250


def test_build_dataset_names():
    assert len(build_dataset("mnist_28", str(DATA / "mnist"), train=False, download=False)) == 10000
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("cifar", "x")


def test_a_missing_folder_downloads_into_the_cache(tmp_path, monkeypatch):
    served = []

    class Response:
        def __init__(self, url):
            self.body = (DATA / "mnist" / url.rsplit("/", 1)[1]).read_bytes()
            served.append(url)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.body

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Response(url))
    ds = MNIST(tmp_path / "not_there", train=False)
    assert len(ds) == 10000 and len(served) == 4 and not (tmp_path / "not_there").exists()
    assert ds.folder == MNIST.cache_dir()
    served.clear()
    assert len(MNIST(tmp_path / "elsewhere", train=False)) == 10000 and served == []   # found in the cache
