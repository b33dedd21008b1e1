"""The downstream protocol: train a classifier on labelled synthetic samples, test it on real data.

As published (``../shared/REFERENCE.md``, section 5): the samples are split 90/10 into training and
validation sets; Adam, learning rate 3e-4, batch 128, up to 50 epochs; the epoch with the best
accuracy on the synthetic validation set is selected and that epoch's accuracy on the REAL test
set is reported. Seeded: the split, the initialisation, the batch order and dropout all come from
one seed, so a run is repeatable on one CPU machine (on a GPU, cuDNN's convolution backward is not
deterministic unless ``torch.backends.cudnn.deterministic`` is set).

Two details follow DPDM's released code (``train_downstream_classifiers.py``) by default, each with our
earlier choice as a named option: inputs (synthetic and real) scaled to [-1, 1] (``input_range=
"minus_one_one"``; ``"zero_one"`` leaves them in [0, 1]), and the training samples visited in the same
order every epoch (``shuffle="fixed"``: the kept samples in their generation order, as the released
loader's ``shuffle=False``; ``"per_epoch"`` draws a new seeded order each epoch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifiers import build_classifier

LR, BATCH, EPOCHS, VAL_FRACTION = 3e-4, 128, 50, 0.1
INPUT_RANGES = ("minus_one_one", "zero_one")
SHUFFLES = ("fixed", "per_epoch")


@dataclass
class DownstreamResult:
    classifier: str
    test_accuracy: float          # on the real test set, at the selected epoch
    best_epoch: int               # 1-based
    val_accuracy: float           # synthetic validation accuracy at that epoch
    epochs: int
    n_train: int
    n_val: int
    history: list = field(default_factory=list)   # per epoch: (val accuracy, real test accuracy)
    input_range: str = "minus_one_one"
    shuffle: str = "fixed"


def to_tensor(images: np.ndarray, input_range: str = "zero_one") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1] (``"zero_one"``) or [-1, 1] (``"minus_one_one"``:
    ``x * 2 - 1`` of the [0, 1] image, as DPDM's released evaluation)."""
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return x.mul_(2).sub_(1) if input_range == "minus_one_one" else x


def epoch_orders(train_indices: np.ndarray, epochs: int, shuffle: str, seed: int):
    """The order of the training samples in each epoch: ``"fixed"`` visits them in their generation order
    every epoch (the released loader), ``"per_epoch"`` in a new order per epoch, seeded."""
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    kept = torch.from_numpy(np.sort(train_indices))
    order = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        yield kept if shuffle == "fixed" else kept[torch.randperm(len(kept), generator=order)]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / max(len(x), 1)


def split(n: int, seed: int, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 90/10 permutation split of n samples: (train indices, validation indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def train_downstream(name: str, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                     test_labels: np.ndarray, *, epochs: int = EPOCHS, seed: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True, input_range: str = "minus_one_one",
                     shuffle: str = "fixed") -> DownstreamResult:
    """One classifier by the protocol: trained on the samples, the real-test accuracy of its best epoch
    (``input_range`` and ``shuffle``: see the module docstring; the defaults are the released code's)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    tr, va = split(len(images), seed)
    if len(tr) == 0:
        raise ValueError(f"{len(images)} samples leave nothing to train on after the 90/10 split")
    x, y = to_tensor(images, input_range).to(device), torch.from_numpy(labels).to(device)
    xt, yt = to_tensor(test_images, input_range).to(device), torch.from_numpy(test_labels).to(device)
    torch.manual_seed(seed)
    model = build_classifier(name).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    history, best = [], (-1.0, 0, 0.0)
    orders = epoch_orders(tr, epochs, shuffle, seed)
    bar = tqdm(range(1, epochs + 1), desc=f"{name}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = next(orders)
        for i in range(0, len(perm), BATCH):
            idx = perm[i:i + BATCH].to(device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val, test = accuracy(model, x[va], y[va]), accuracy(model, xt, yt)
        history.append((val, test))
        if val > best[0]:
            best = (val, epoch, test)
        bar.set_postfix(val=f"{val:.4f}", best_epoch=best[1])
    return DownstreamResult(name, best[2], best[1], best[0], epochs, len(tr), len(va), history, input_range, shuffle)
