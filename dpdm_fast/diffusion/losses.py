"""Denoising score-matching losses with noise multiplicity K.

Each loss takes B clean examples, builds B*K noisy rows laid out group-major (rows
i*K .. i*K+K-1 belong to example i, as DPDM's ``repeat_interleave``), runs the denoiser once
on all rows and returns the per-example loss of shape (B,): the mean over the K rows and
all pixels. ``loss.mean()`` is therefore the mean over the B*K rows, which is what the DP
engine's ``loss_reduction='mean'`` expects; ``loss.sum()`` goes with ``'sum'``.
"""
from __future__ import annotations

import inspect
import math

import torch

from .denoisers import Denoiser, VPDenoiser, v_sigma


def drop_labels(y: torch.Tensor | None, num_classes: int | None, p: float,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Replace each example's label by the 'no label' token ``num_classes`` with probability p."""
    if y is None:
        return None
    if num_classes is None:
        raise ValueError("labels were given but num_classes is None: set loss.n_classes")
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


class DiffusionLoss:
    """Shared machinery; subclasses choose how sigma is drawn and how rows are weighted."""

    def __init__(self, n_noise_samples: int = 1, label_unconditioning_prob: float = 0.1,
                 n_classes: int | None = None):
        if n_noise_samples < 1:
            raise ValueError(f"n_noise_samples (K) must be >= 1, got {n_noise_samples}")
        self.n_noise_samples = n_noise_samples
        self.label_unconditioning_prob = label_unconditioning_prob
        self.n_classes = n_classes

    def sample_sigma(self, shape: tuple[int, int], generator, device) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example loss (B,) of B clean examples, each noised K times."""
        clean, sigma, noise, y_rows = self.make_rows(x, y, generator)
        return self.rows_loss(denoiser, clean, sigma, noise, y_rows)

    def make_rows(self, x: torch.Tensor, y: torch.Tensor | None = None,
                  generator: torch.Generator | None = None):
        """The B*K group-major rows: clean images, sigmas, Gaussian noises and labels.

        Labels are dropped per *example* (all K rows of an example share the decision), as in DPDM.
        """
        B, K = x.shape[0], self.n_noise_samples
        y = drop_labels(y, self.n_classes, self.label_unconditioning_prob, generator)
        y_rows = None if y is None else y.repeat_interleave(K)
        sigma = self.sample_sigma((B, K), generator, x.device).to(x.dtype)
        sigma = sigma.reshape(B * K, *([1] * (x.dim() - 1)))
        clean = x.repeat_interleave(K, dim=0)
        noise = torch.randn(clean.shape, generator=generator, device=x.device, dtype=x.dtype)
        return clean, sigma, noise, y_rows

    def rows_loss(self, denoiser: Denoiser, clean: torch.Tensor, sigma: torch.Tensor,
                  noise: torch.Tensor, y_rows: torch.Tensor | None) -> torch.Tensor:
        """Weighted denoising error of group-major rows, averaged per group of K rows."""
        K = self.n_noise_samples
        if clean.shape[0] % K:
            raise ValueError(f"{clean.shape[0]} rows is not a multiple of K={K}")
        pred = denoiser(clean + sigma * noise, sigma, y_rows)
        row_loss = self.weight(sigma) * (pred - clean) ** 2
        per_group = K * math.prod(row_loss.shape[1:])   # explicit, so that an empty batch reshapes too
        return row_loss.reshape(clean.shape[0] // K, per_group).mean(dim=1)


class EDMLoss(DiffusionLoss):
    """ln(sigma) ~ N(p_mean, p_std^2); weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = math.sqrt(1.0 / 3), **kw):
        super().__init__(**kw)
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def sample_sigma(self, shape, generator, device):
        return torch.exp(self.p_mean + self.p_std * torch.randn(shape, generator=generator, device=device))

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def v_time_of_logsnr(logsnr: float) -> float:
    return 2.0 * math.acos(1.0 / math.sqrt(1.0 + math.exp(-logsnr))) / math.pi


class VLoss(DiffusionLoss):
    """t uniform between t(logsnr_max) and t(logsnr_min); weight (sigma^2 + 1) / sigma^2."""

    def __init__(self, logsnr_min: float = -9.0, logsnr_max: float = 13.0, **kw):
        super().__init__(**kw)
        self.t_min, self.t_max = v_time_of_logsnr(logsnr_max), v_time_of_logsnr(logsnr_min)

    def sample_sigma(self, shape, generator, device):
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(shape, generator=generator, device=device)
        return v_sigma(t)

    def weight(self, sigma):
        return (sigma**2 + 1.0) / sigma**2


class VELoss(DiffusionLoss):
    """ln(sigma) uniform in [ln sigma_min, ln sigma_max]; weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, **kw):
        super().__init__(**kw)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, shape, generator, device):
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + (hi - lo) * torch.rand(shape, generator=generator, device=device))

    def weight(self, sigma):
        return 1.0 / sigma**2


class VPLoss(DiffusionLoss):
    """t uniform in [eps_t, 1], sigma(t) of the VP SDE; weight 1 / sigma^2."""

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, eps_t: float = 1e-5, **kw):
        super().__init__(**kw)
        self.eps_t = eps_t
        self._schedule = VPDenoiser(torch.nn.Identity(), beta_min=beta_min, beta_d=beta_d)

    def sample_sigma(self, shape, generator, device):
        t = self.eps_t + (1.0 - self.eps_t) * torch.rand(shape, generator=generator, device=device)
        return self._schedule.sigma(t)

    def weight(self, sigma):
        return 1.0 / sigma**2


LOSSES = {"edm": EDMLoss, "v": VLoss, "ve": VELoss, "vp": VPLoss}


def _init_params(cls) -> set[str]:
    return {name for c in cls.__mro__ if c is not object
            for name in inspect.signature(c.__init__).parameters if name not in ("self", "kw", "kwargs")}


def build_loss(version: str, **kwargs) -> DiffusionLoss:
    """Loss by DPDM's ``loss.version`` ('edm', 'v', 've', 'vp').

    Accepts a whole ``loss`` config section: keys that belong to another version's loss (e.g.
    ``logsnr_min`` for EDM) are not used; a key that no loss knows is an error.
    """
    if version not in LOSSES:
        raise ValueError(f"unknown loss version {version!r}; choose one of {sorted(LOSSES)}")
    known = set().union(*(_init_params(c) for c in LOSSES.values()))
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(f"unknown loss options {sorted(unknown)}; valid: {sorted(known)}")
    own = _init_params(LOSSES[version])
    return LOSSES[version](**{k: v for k, v in kwargs.items() if k in own})
