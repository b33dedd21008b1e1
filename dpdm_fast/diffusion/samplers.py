"""Samplers: DPDM's DDIM (deterministic and stochastic) and EDM's Heun sampler, with guidance.

Every sampler works in sigma (the noise level of x = x0 + sigma * n), so it serves any
:class:`~dpdm_fast.diffusion.Denoiser` (EDM, v-prediction, VE, VP): the preconditioning maps
sigma to the network's inputs. Step definitions follow DPDM's release so that its sample configs
(``sampler.*``) reproduce: noise levels from ``tmax`` down to ``tmin`` spaced evenly in
sigma^(1/rho) (EDM's schedule).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def noise_levels(num_steps: int, tmin: float, tmax: float, rho: float, device=None) -> torch.Tensor:
    """``num_steps`` sigmas from tmax to tmin, evenly spaced in sigma^(1/rho) (float64)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not 0 < tmin < tmax:
        raise ValueError(f"need 0 < tmin < tmax, got tmin={tmin}, tmax={tmax}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64, device=device)
    return (tmax ** (1 / rho) + ramp * (tmin ** (1 / rho) - tmax ** (1 / rho))) ** rho


def guided(denoiser: DenoiseFn, guid_scale: float, no_label: int | None) -> DenoiseFn:
    """Classifier-free guidance: (1 + w) D(x, y) - w D(x, no label); w = 0 is the conditional model.

    Both evaluations run as one batch of 2N rows.
    """
    if guid_scale == 0:
        return denoiser
    if guid_scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {guid_scale}")
    if no_label is None:
        raise ValueError("guidance needs a class-conditional model trained with label dropout (use_cfg); "
                         "this one has no 'no label' token")

    def denoise(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise ValueError("guidance needs labels y")
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([y, torch.full_like(y, no_label)]))
        cond, uncond = both.chunk(2)
        return (1 + guid_scale) * cond - guid_scale * uncond

    return denoise


def _at(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One noise level, as a (N, 1, 1, 1) tensor in x's dtype."""
    return sigma.to(x.dtype).expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1)))


def ddim_sample(denoiser: DenoiseFn, noise: torch.Tensor, y: torch.Tensor | None = None, *, num_steps: int = 50,
                tmin: float = 0.002, tmax: float = 80.0, rho: float = 7.0, stochastic: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DPDM's DDIM sampler from ``noise`` ~ N(0, I).

    Deterministic: Euler steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    between the ``num_steps`` noise levels. Stochastic: Euler-Maruyama steps of the reverse SDE
    (drift twice the ODE's, plus sqrt(2 |dsigma| sigma) fresh noise). Either way the result is the
    denoiser's output at the last level ``tmin``.
    """
    levels = noise_levels(num_steps, tmin, tmax, rho, noise.device)
    x = noise * levels[0].to(noise.dtype)
    for t0, t1 in zip(levels[:-1], levels[1:]):
        s0 = _at(t0, x)
        d = (x - denoiser(x, s0, y)) / s0
        dt = (t1 - t0).to(x.dtype)
        if stochastic:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + 2 * dt * d + torch.sqrt(2 * dt.abs() * t0.to(x.dtype)) * z
        else:
            x = x + dt * d
    return denoiser(x, _at(levels[-1], x), y)


def edm_sample(denoiser: DenoiseFn, noise: torch.Tensor, y: torch.Tensor | None = None, *, num_steps: int = 50,
               tmin: float = 0.002, tmax: float = 80.0, rho: float = 7.0, s_churn: float = 0.0, s_min: float = 0.0,
               s_max: float = float("inf"), s_noise: float = 1.0, churn_limit: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 2) as DPDM runs it.

    At levels within [s_min, s_max] the noise level is first raised by gamma = min(s_churn /
    num_steps, churn_limit) (fresh noise scaled by s_noise); then a Heun step to the next level
    (an Euler step to sigma = 0 at the end). ``s_churn=0`` is the deterministic Heun sampler.
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    levels = torch.cat([noise_levels(num_steps, tmin, tmax, rho, noise.device),
                        torch.zeros(1, dtype=torch.float64, device=noise.device)])
    x = noise * levels[0].to(noise.dtype)
    for t0, t1 in zip(levels[:-1], levels[1:]):
        gamma = min(s_churn / num_steps, churn_limit) if s_min <= float(t0) <= s_max else 0.0
        t_hat = t0 * (1 + gamma)
        if gamma > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + (s_noise * math.sqrt(float(t_hat**2 - t0**2))) * z
        d = (x - denoiser(x, _at(t_hat, x), y)) / t_hat.to(x.dtype)
        step = (t1 - t_hat).to(x.dtype)
        x_next = x + step * d
        if t1 > 0:   # Heun's correction (2nd order), except on the last step to sigma = 0
            d_next = (x_next - denoiser(x_next, _at(t1, x), y)) / t1.to(x.dtype)
            x_next = x + step * (d + d_next) / 2
        x = x_next
    return x


SAMPLERS = {"ddim": ddim_sample, "edm": edm_sample}


def sample(denoiser: DenoiseFn, noise: torch.Tensor, y: torch.Tensor | None = None, *, type: str = "ddim",
           guid_scale: float = 0.0, no_label: int | None = None, generator: torch.Generator | None = None,
           **options) -> torch.Tensor:
    """Run the sampler named by ``type`` ('ddim' or 'edm') with a config's ``sampler.*`` options.

    Options the chosen sampler does not take (e.g. ``s_churn`` for DDIM, ``stochastic`` for EDM)
    must be at their defaults; anything else is an error rather than silently ignored.
    """
    if type not in SAMPLERS:
        raise ValueError(f"unknown sampler {type!r}; choose one of {sorted(SAMPLERS)}")
    defaults = {"stochastic": False, "s_churn": 0.0, "s_min": 0.0, "s_max": float("inf"), "s_noise": 1.0}
    takes = set(inspect.signature(SAMPLERS[type]).parameters)
    for key in list(options):
        if key not in takes:
            if key in defaults and options[key] != defaults[key]:
                raise ValueError(f"sampler {type!r} has no option {key}={options[key]!r} (it belongs to "
                                 f"{'ddim' if key == 'stochastic' else 'edm'})")
            if key not in defaults:
                raise ValueError(f"unknown sampler option {key!r}")
            options.pop(key)
    with torch.no_grad():
        return SAMPLERS[type](guided(denoiser, guid_scale, no_label), noise, y, generator=generator, **options)
