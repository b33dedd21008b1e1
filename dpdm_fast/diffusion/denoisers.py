"""Denoiser preconditionings: D(x, sigma, y) = c_skip * x + c_out * F(c_in * x, c_noise, y).

Formulas are EDM's Table 1 (Karras et al. 2022) as used by DPDM; ``sigma`` broadcasts against
``x`` (shape (N, 1, 1, 1) or (N,)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

Coefficients = tuple[torch.Tensor | float, torch.Tensor | float, torch.Tensor | float, torch.Tensor]


class Denoiser(nn.Module):
    """Wraps a network F; subclasses supply the four preconditioning coefficients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], *([1] * (x.dim() - 1)))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        out = self.model(c_in * x, c_noise.reshape(-1), y)
        return c_skip * x + c_out * out


class EDMDenoiser(Denoiser):
    def __init__(self, model: nn.Module, sigma_data: float = math.sqrt(1.0 / 3)):
        super().__init__(model)
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        root = torch.sqrt(sigma**2 + sd2)
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / root, 1.0 / root, 0.25 * torch.log(sigma)


def v_time(sigma: torch.Tensor) -> torch.Tensor:
    """t in [0, 1] of the cosine schedule for a given sigma (inverse of ``v_sigma``)."""
    return 2.0 * torch.arccos(1.0 / torch.sqrt(1.0 + sigma**2)) / math.pi


def v_sigma(t: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.cos(math.pi * t / 2.0) ** -2 - 1.0)


class VDenoiser(Denoiser):
    """v-prediction (Salimans & Ho 2022), DPDM's choice for the smallest epsilon."""

    def coefficients(self, sigma):
        root = torch.sqrt(sigma**2 + 1.0)
        return 1.0 / (sigma**2 + 1.0), sigma / root, 1.0 / root, v_time(sigma)


class VEDenoiser(Denoiser):
    def coefficients(self, sigma):
        return 1.0, sigma, 1.0, torch.log(sigma / 2.0)


class VPDenoiser(Denoiser):
    def __init__(self, model: nn.Module, beta_min: float = 0.1, beta_d: float = 19.9, M: float = 1000.0):
        super().__init__(model)
        self.beta_min, self.beta_d, self.M = beta_min, beta_d, M

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        ratio = self.beta_min / self.beta_d
        return -ratio + torch.sqrt(ratio**2 + 2.0 * torch.log(sigma**2 + 1.0) / self.beta_d)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1.0)

    def coefficients(self, sigma):
        return 1.0, -sigma, 1.0 / torch.sqrt(sigma**2 + 1.0), self.M * self.time(sigma)


DENOISERS = {"edm": EDMDenoiser, "v": VDenoiser, "ve": VEDenoiser, "vp": VPDenoiser}


def build_denoiser(name: str, model: nn.Module, **kwargs) -> Denoiser:
    """Denoiser by DPDM's ``model.denoiser_name`` ('edm', 'v', 've', 'vp')."""
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; choose one of {sorted(DENOISERS)}")
    return DENOISERS[name](model, **kwargs)
