"""Reading a SAMPLES.npz (as ``dpdm-fast sample`` writes it) and the real data it is compared with,
with every mismatch an error that says what is wrong."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOL_SAMPLES = 60_000


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    size: int
    channels: int
    classes: int | None      # None: unlabelled (FID only)
    paper_name: str


DATASETS = {
    "mnist": DatasetSpec("mnist", 28, 1, 10, "MNIST"),
    "fmnist": DatasetSpec("fmnist", 28, 1, 10, "F-MNIST"),
    "celeba": DatasetSpec("celeba", 32, 3, None, "CelebA32"),
}


class SamplesError(ValueError):
    """The samples file does not fit the evaluation asked for."""


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise SamplesError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name]


def load_samples(path: str | Path, dataset: str, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None, list]:
    """(images uint8 (N, H, W, C), labels int64 (N,) or None, notes) from SAMPLES.npz, checked against
    the dataset: shape and channels, uint8 range, labels present and in range. Fewer samples than the
    protocol's 60,000 run with a warning and a note for the report (a reduced protocol, said so)."""
    spec = dataset_spec(dataset)
    path = Path(path)
    if not path.exists():
        raise SamplesError(f"{path} does not exist (write one with `dpdm-fast sample`)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SamplesError(f"{path} is a single array, not an .npz with 'images' and 'labels' (as "
                               "`dpdm-fast sample` writes)")
        with loaded as f:
            if "images" not in f:
                raise SamplesError(f"{path} has no 'images' array (keys: {sorted(f.keys())}); it must hold "
                                   "'images' (uint8 N x H x W x C) and 'labels', as `dpdm-fast sample` writes")
            images = f["images"]
            labels = f["labels"] if "labels" in f else None
    except (OSError, ValueError) as e:
        if isinstance(e, SamplesError):
            raise
        raise SamplesError(f"{path} is not a readable .npz file: {e}") from e
    if images.dtype != np.uint8:
        hint = (" (floats in [0, 1] or [-1, 1]? quantise them: np.round((x + 1) * 127.5).astype(np.uint8))"
                if np.issubdtype(images.dtype, np.floating) else "")
        raise SamplesError(f"images must be uint8 in [0, 255], got {images.dtype}{hint}")
    if images.ndim == 3 and spec.channels == 1:
        images = images[..., None]
    want = (spec.size, spec.size, spec.channels)
    if images.ndim != 4 or images.shape[1:] != want:
        raise SamplesError(f"images have shape {images.shape}; {dataset} needs N x {want[0]} x {want[1]} x {want[2]} "
                           "(channels last)")
    if len(images) == 0:
        raise SamplesError(f"{path} holds no images")
    notes = []
    if spec.classes is not None and need_labels:
        if labels is None:
            raise SamplesError(f"{path} has no 'labels': the downstream protocol trains classifiers on labelled "
                               "samples (sample a class-conditional model with `dpdm-fast sample`)")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise SamplesError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        bad = (labels < 0) | (labels >= spec.classes)
        if bad.any():
            raise SamplesError(f"{int(bad.sum())} labels outside 0..{spec.classes - 1} (e.g. {labels[bad][:5].tolist()}; "
                               "-1 marks unlabelled samples of an unconditional model)")
        labels = labels.astype(np.int64)
    if len(images) > PROTOCOL_SAMPLES:
        notes.append(f"{len(images)} samples: the protocol's first {PROTOCOL_SAMPLES} are used")
        images = images[:PROTOCOL_SAMPLES]
        labels = labels[:PROTOCOL_SAMPLES] if labels is not None else None
    if len(images) < PROTOCOL_SAMPLES:
        note = (f"reduced protocol: {len(images)} samples instead of the protocol's {PROTOCOL_SAMPLES}; "
                "numbers are not comparable with the paper's")
        warnings.warn(note, stacklevel=2)
        notes.append(note)
    return images, labels, notes


def sample_options(path: str | Path) -> dict[str, str]:
    """How the samples were made, as ``dpdm-fast sample`` records it beside them: ``label_mode`` ('random',
    'balanced', 'class k', 'unconditional') and ``quantize`` ('truncate', 'round'); 'not recorded' for files
    written otherwise (or by older versions)."""
    found = {"label_mode": "not recorded", "quantize": "not recorded"}
    with np.load(path, allow_pickle=False) as f:
        for key in found:
            if key in f:
                found[key] = str(f[key])
    return found


def real_split(dataset: str, data_dir: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The real training or test set as (uint8 N x H x W x C, labels or None), from the dataset's reader
    (MNIST / Fashion-MNIST IDX files, CelebA's folder or zip)."""
    from ..data import build_dataset
    spec = dataset_spec(dataset)
    name = {"mnist": "mnist_28", "fmnist": "fmnist_28", "celeba": "celeba_32"}[spec.name]
    ds = build_dataset(name, str(data_dir), train=train)
    images = np.asarray(ds.data, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray(ds.targets, dtype=np.int64) if spec.classes is not None else None
    return images, labels
