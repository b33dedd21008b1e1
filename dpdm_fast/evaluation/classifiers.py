"""The downstream classifiers of DPDM's evaluation (the paper's code): logistic regression, a one-hidden-
layer MLP and a small CNN, all on 28x28 single-channel images in [0, 1]."""
from __future__ import annotations

import torch.nn as nn


def logreg() -> nn.Module:
    """784 -> 10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def mlp() -> nn.Module:
    """784 -> 100 -> 10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn(dropout: float = 0.5) -> nn.Module:
    """Conv(1,32,3)-MaxPool2-ReLU-Dropout0.5-Conv(32,64,3)-MaxPool2-ReLU-Dropout0.5-Conv(64,128,3)-ReLU-
    Linear(1152,128)-ReLU-Dropout0.5-Linear(128,10) (``dropout`` changes the rate; the protocol's is 0.5)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(1152, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10))


CLASSIFIERS = {"logreg": logreg, "mlp": mlp, "cnn": cnn}


def build_classifier(name: str, **kw) -> nn.Module:
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; choose from {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name](**kw)
