"""Stage 1 of DP-FETA: "central images", noised per-class means of down-sampled private images.

Each of T rounds Poisson-samples the private set at rate q_c and releases, per class, the SUM of the
down-sampled images (pixels in [0, 1]) plus Gaussian noise of std sigma_c * bound, where bound =
sqrt(C h w) is the largest L2 norm of one down-sampled image: adding or removing one example moves
one class's sum by at most that, so each round is the subsampled Gaussian mechanism the accountant
composes (noise multiplier sigma_c, rate q_c). The sum is divided by a PUBLIC constant, the expected
per-class count (N_public q_c / classes); a mean over the realised, random count (as DP-FETA's code
takes it) is not that mechanism. Clamping, up-sampling and blurring afterwards are post-processing.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .release import Release


def downsampled_size(resolution: int, factor: float) -> int:
    size = int(round(resolution * factor))
    if size < 1:
        raise ValueError(f"warmup.central.downsample={factor} leaves no pixel of a {resolution}px image")
    return size


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C, size, size), by area averaging: every output pixel is a convex
    combination of input pixels, so it stays in [0, 1] (the sensitivity bound relies on that)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


def sensitivity(channels: int, size: int) -> float:
    """The largest L2 norm of one down-sampled image with pixels in [0, 1]: what one example moves a sum by."""
    return math.sqrt(channels * size * size)


def expected_class_count(public_size: int, sample_rate: float, n_groups: int) -> float:
    """The public divisor: the expected number of examples of a class in one round's Poisson sample
    (classes taken as equally frequent, a public assumption: it only scales the released images)."""
    return public_size * sample_rate / n_groups


def release_entry(cfg) -> Release:
    """The accountant's view of stage 1: T rounds of a subsampled Gaussian, noise multiplier sigma_c at q_c."""
    c = cfg.warmup.central
    return Release("central_images", float(c.noise_multiplier), float(c.sample_rate), int(c.rounds))


@torch.no_grad()
def noisy_class_means(images: torch.Tensor, labels: torch.Tensor | None, *, n_groups: int, rounds: int,
                      sample_rate: float, noise_multiplier: float, size: int, public_size: int,
                      generator: torch.Generator, chunk: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """The released quantity, before post-processing: (rounds * n_groups, C, size, size) noisy sums over the
    public expected count (unclamped), and their labels (round-major: round r, class k at r * n_groups + k).

    ``images``: the private set as uint8 (N, C, H, W); ``labels``: (N,) classes, or None (one group)."""
    n, channels = images.shape[0], images.shape[1]
    if labels is None:
        labels = torch.zeros(n, dtype=torch.long)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= n_groups):
        raise ValueError(f"labels outside 0..{n_groups - 1}")
    bound = sensitivity(channels, size)
    divisor = expected_class_count(public_size, sample_rate, n_groups)
    out, out_labels = [], []
    for _ in range(rounds):
        chosen = torch.rand(n, generator=generator) < sample_rate      # Poisson: each example independently
        sums = torch.zeros(n_groups, channels, size, size, dtype=torch.float64)
        picked = chosen.nonzero().squeeze(1)
        for start in range(0, len(picked), chunk):
            idx = picked[start:start + chunk]
            small = downsample(images[idx].float() / 255, size).double()
            sums.index_add_(0, labels[idx], small)
        noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * bound)
        out.append(((sums + noise) / divisor).float())
        out_labels.append(torch.arange(n_groups))
    return torch.cat(out), torch.cat(out_labels)


def postprocess(means: torch.Tensor, resolution: int, median_blur: int = 0, sharpen: float = 0.0) -> torch.Tensor:
    """Released means -> central images in [0, 1] at the data's resolution: clamp, up-sample (bilinear),
    then optionally kornia's median blur and sharpening (all post-processing of the release)."""
    images = means.clamp(0, 1)
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    if median_blur:
        import kornia
        images = kornia.filters.median_blur(images, (median_blur, median_blur))
    if sharpen:
        import kornia
        images = kornia.enhance.sharpness(images, sharpen)
    return images.clamp(0, 1)


def private_images(dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dataset's images as uint8 (N, C, H, W) and labels (N,) (or None when unlabelled)."""
    data = np.asarray(dataset.data, dtype=np.uint8)
    if data.ndim == 3:
        data = data[..., None]
    images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2)
    targets = getattr(dataset, "targets", None)
    labels = None if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return images, labels


def release_central_images(dataset, cfg, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on a dataset under a config: (central images (T * classes, C, H, W) in [0, 1], labels)."""
    c = cfg.warmup.central
    images, labels = private_images(dataset)
    n_groups = int(cfg.data.n_classes) if cfg.data.n_classes else 1
    if not cfg.data.n_classes:
        labels = None
    public_size = cfg.data.public_size if cfg.data.public_size is not None else len(images)
    size = downsampled_size(images.shape[-1], c.downsample)
    means, released_labels = noisy_class_means(images, labels, n_groups=n_groups, rounds=c.rounds,
                                               sample_rate=c.sample_rate, noise_multiplier=c.noise_multiplier,
                                               size=size, public_size=public_size, generator=generator)
    return postprocess(means, images.shape[-1], c.median_blur, c.sharpen), released_labels
