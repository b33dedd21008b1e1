"""Datasets: real image files in, images scaled to [-1, 1] out."""
from .celeba import CelebA, center_crop_resize
from .mnist import MNIST, CorruptDataError, FashionMNIST, read_idx

__all__ = ["MNIST", "FashionMNIST", "CelebA", "CorruptDataError", "read_idx", "center_crop_resize", "build_dataset"]


def build_dataset(name: str, path: str, train: bool = True, **kwargs):
    """Dataset by DPDM's ``data.name`` ('mnist_28', 'fmnist_28', 'celeba_32', 'celeba_64')."""
    if name == "mnist_28":
        return MNIST(path, train=train, **kwargs)
    if name == "fmnist_28":
        return FashionMNIST(path, train=train, **kwargs)
    if name in ("celeba_32", "celeba_64"):
        return CelebA(path, split="train" if train else "test", resolution=int(name.split("_")[1]), **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose mnist_28, fmnist_28, celeba_32 or celeba_64")
