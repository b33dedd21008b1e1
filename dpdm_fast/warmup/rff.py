"""Stage 1b of FETA-Pro: one release of the class-conditional mean random-Fourier-feature embedding
(DP-MERF), and a small generator trained, non-privately, to match it.

The embedding of an image x (pixels in [0, 1], flattened) is psi(x) = [phi(x), 1] / sqrt(2), where
phi(x) = sqrt(2 / D) [cos(W x), sin(W x)] are D random Fourier features of a Gaussian kernel of
length scale ``bandwidth`` (W ~ N(0, 1 / bandwidth^2), public randomness): ||phi(x)|| = 1, so
||psi(x)|| = 1. The release is, per class, the SUM of psi over the private examples of that class
plus N(0, sigma_r^2) per coordinate: adding or removing one example moves one class's row by a unit
vector, so it is one Gaussian mechanism of noise multiplier sigma_r on the whole dataset (q = 1).
The class means of phi and the class counts follow by post-processing (the count is sqrt(2) times
the last coordinate), as does everything the generator does with them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from .release import Release


def release_entry(cfg) -> Release:
    """The accountant's view of stage 1b: one Gaussian mechanism (q = 1) with noise multiplier sigma_r."""
    return Release("rff_embedding", float(cfg.warmup.rff.noise_multiplier), 1.0, 1)


def frequencies(dim: int, n_features: int, bandwidth: float, seed: int) -> torch.Tensor:
    """W (dim, n_features / 2): the random frequencies (public: drawn from a seed, not from the data)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, n_features // 2, generator=gen, dtype=torch.float64).float() / bandwidth


def features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """phi(x) (N, D) of flattened images (N, dim) in [0, 1]: unit norm for every x."""
    proj = x @ w
    return torch.cat([proj.cos(), proj.sin()], dim=1) * math.sqrt(2 / (2 * w.shape[1]))


@torch.no_grad()
def noisy_class_embedding(images: torch.Tensor, labels: torch.Tensor | None, n_groups: int, w: torch.Tensor,
                          noise_multiplier: float, generator: torch.Generator, chunk: int = 2000) -> torch.Tensor:
    """The release: (n_groups, D + 1) per-class sums of psi(x) plus Gaussian noise of std sigma_r.
    ``images``: uint8 (N, C, H, W); ``labels``: (N,) or None (one group)."""
    n = len(images)
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    sums = torch.zeros(n_groups, w.shape[1] * 2 + 1, dtype=torch.float64)
    for start in range(0, n, chunk):
        x = images[start:start + chunk].flatten(1).float() / 255
        psi = torch.cat([features(x, w), torch.ones(len(x), 1)], dim=1) / math.sqrt(2)
        sums.index_add_(0, labels[start:start + chunk], psi.double())
    noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64) * noise_multiplier
    return (sums + noise).float()


def class_means(released: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-processing of the release: (mean phi per class (n_groups, D), noisy class counts (n_groups,),
    clamped at 1 so that a class with a tiny or negative noisy count does not blow its mean up)."""
    counts = (released[:, -1] * math.sqrt(2)).clamp(min=1.0)
    return released[:, :-1] * math.sqrt(2) / counts[:, None], counts


class ConditionalGenerator(nn.Module):
    """A small conditional convolutional generator: (noise z, class) -> image in [0, 1]."""

    def __init__(self, n_groups: int, channels: int, resolution: int, z_dim: int = 32, width: int = 128):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the generator needs a resolution divisible by 4, got {resolution}")
        self.n_groups, self.z_dim, self.start = n_groups, z_dim, resolution // 4
        self.stem = nn.Linear(z_dim + n_groups, width * self.start ** 2)
        self.body = nn.Sequential(
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2),
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(width // 2, width // 4, 3, padding=1),
            nn.BatchNorm2d(width // 4), nn.ReLU(), nn.Conv2d(width // 4, channels, 3, padding=1), nn.Sigmoid())
        self.width = width

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([z, nn.functional.one_hot(y, self.n_groups).float()], dim=1))
        return self.body(h.view(len(z), self.width, self.start, self.start))


def train_generator(released: torch.Tensor, w: torch.Tensor, *, channels: int, resolution: int, steps: int,
                    batch_size: int, lr: float, seed: int, progress: bool = False) -> ConditionalGenerator:
    """Fit the generator so that each class's mean phi of its images matches the released class mean
    (the RFF maximum mean discrepancy, weighted by the noisy class frequencies). Reads only the release."""
    from tqdm.auto import tqdm
    means, counts = class_means(released)
    weights = counts / counts.sum()
    n_groups = len(means)
    torch.manual_seed(seed)
    gen = ConditionalGenerator(n_groups, channels, resolution)
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    per_class = max(1, batch_size // n_groups)
    y = torch.arange(n_groups).repeat_interleave(per_class)
    for _ in tqdm(range(steps), desc="warm-up: generator", disable=not progress, leave=False):
        x = gen(torch.randn(len(y), gen.z_dim), y)
        phi = features(x.flatten(1), w).view(n_groups, per_class, -1).mean(1)
        loss = (weights * (phi - means).pow(2).sum(1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return gen.eval()


@torch.no_grad()
def generate_images(gen: ConditionalGenerator, released: torch.Tensor, n: int, seed: int,
                    batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """n images in [0, 1] and their labels, classes drawn in the noisy class frequencies of the release."""
    _, counts = class_means(released)
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(counts / counts.sum(), n, replacement=True, generator=g)
    images = torch.cat([gen(torch.randn(len(labels[i:i + batch]), gen.z_dim, generator=g), labels[i:i + batch])
                        for i in range(0, n, batch)])
    return images, labels


def frequencies_for(cfg, dim: int) -> torch.Tensor:
    """The config's frequencies (seeded from warmup.seed: a public choice, recorded in the config)."""
    r = cfg.warmup.rff
    return frequencies(dim, int(r.n_features), float(r.bandwidth), int(np.random.SeedSequence([cfg.warmup.seed, 1]).generate_state(1)[0]))
