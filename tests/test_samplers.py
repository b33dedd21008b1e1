"""Samplers against a data distribution whose ideal denoiser is known in closed form.

Data x0 ~ N(mu, s^2) per pixel: the ideal denoiser is D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu),
so a correct sampler's outputs have mean mu and standard deviation s (up to its discretisation
error, which shrinks with the number of steps).
"""
import math

import pytest
import torch
import torch.nn as nn

from dpdm_fast.diffusion import EDMDenoiser, VDenoiser
from dpdm_fast.diffusion.denoisers import v_sigma
from dpdm_fast.diffusion.samplers import ddim_sample, edm_sample, guided, noise_levels, sample

MU, S = 0.3, 0.5


def ideal(x, sigma, y=None):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


class OracleNetwork(nn.Module):
    """The network F that makes a preconditioned denoiser ideal: F = (D - c_skip x) / c_out,
    with sigma recovered from the network's own inputs (c_noise), as a trained network must."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x_in, c_noise, y=None):
        if self.kind == "edm":
            sigma = torch.exp(4 * c_noise)
        else:
            sigma = v_sigma(c_noise)
        sigma = sigma.reshape(-1, 1, 1, 1)
        denoiser = EDMDenoiser(nn.Identity()) if self.kind == "edm" else VDenoiser(nn.Identity())
        c_skip, c_out, c_in, _ = denoiser.coefficients(sigma)
        x = x_in / c_in
        return (ideal(x, sigma) - c_skip * x) / c_out


def noise(n=20000):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def moments(x):
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize("options, tol", [
    (dict(type="ddim", num_steps=400), 0.01),
    (dict(type="ddim", num_steps=400, stochastic=True), 0.02),
    (dict(type="edm", num_steps=50), 0.015),
    (dict(type="edm", num_steps=200, s_churn=80, s_min=0.05, s_max=50), 0.02),
])
def test_samples_of_the_ideal_denoiser_have_the_data_mean_and_variance(options, tol):
    x = sample(ideal, noise(), generator=torch.Generator().manual_seed(1), **options)
    mean, std = moments(x)
    assert abs(mean - MU) < 0.01          # 80k draws: standard error 0.002
    assert abs(std - S) < tol * S


def test_few_euler_steps_are_measurably_off_so_the_moment_test_has_teeth():
    _, std = moments(sample(ideal, noise(), type="ddim", num_steps=10))
    assert abs(std - S) > 0.02 * S


@pytest.mark.parametrize("kind", ["edm", "v"])
def test_preconditioned_denoisers_sample_the_data_distribution(kind):
    net = OracleNetwork(kind)
    denoiser = EDMDenoiser(net) if kind == "edm" else VDenoiser(net)
    for options in (dict(type="edm", num_steps=50), dict(type="ddim", num_steps=400)):
        mean, std = moments(sample(denoiser, noise(), **options))
        assert abs(mean - MU) < 0.01 and abs(std - S) < 0.015 * S


def test_guidance_zero_is_the_conditional_model_and_w_mixes_the_two():
    calls = []

    def labelled(x, sigma, y):
        calls.append(len(x))
        return ideal(x, sigma) + (y.to(x.dtype).reshape(-1, 1, 1, 1) - 10) * 0.01   # label 10 = 'no label'

    y = torch.arange(8) % 3
    z = noise(8)
    plain = sample(labelled, z, y, type="edm", num_steps=5)
    assert torch.equal(sample(labelled, z, y, type="edm", num_steps=5, guid_scale=0.0, no_label=10), plain)
    calls.clear()
    w = 1.5
    out = guided(labelled, w, no_label=10)(z, torch.ones(8, 1, 1, 1, dtype=z.dtype), y)
    expected = (1 + w) * labelled(z, torch.ones(8, 1, 1, 1, dtype=z.dtype), y) - w * labelled(
        z, torch.ones(8, 1, 1, 1, dtype=z.dtype), torch.full_like(y, 10))
    assert calls[0] == 16                 # conditional and unconditional in one batch
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError, match="no 'no label' token"):
        guided(labelled, 1.0, no_label=None)


@pytest.mark.parametrize("options", [dict(type="ddim", stochastic=True), dict(type="edm", s_churn=10)])
def test_same_seed_same_samples_other_seed_other_samples(options):
    def run(seed):
        return sample(ideal, noise(64), generator=torch.Generator().manual_seed(seed), num_steps=8, **options)
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_noise_levels_follow_the_edm_schedule():
    levels = noise_levels(50, 0.002, 80.0, 7.0)
    assert levels[0].item() == pytest.approx(80.0) and levels[-1].item() == pytest.approx(0.002)
    roots = levels ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(49))


@pytest.mark.parametrize("bad, match", [
    (dict(type="ddpm"), "unknown sampler"),
    (dict(type="ddim", s_churn=5.0), "no option s_churn"),
    (dict(type="edm", stochastic=True), "no option stochastic"),
    (dict(type="ddim", num_steps=1), "num_steps"),
    (dict(type="ddim", tmin=1.0, tmax=0.5), "tmin < tmax"),
    (dict(type="edm", guid_scale=-1.0, no_label=10), "guidance scale"),
])
def test_bad_sampler_options_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        sample(ideal, noise(4), torch.zeros(4, dtype=torch.long), **bad)


def test_deterministic_samplers_agree_with_their_formulas_step_by_step():
    # Two-level DDIM: x1 = x0 + (t1 - t0) (x0 - D(x0, t0)) / t0, result D(x1, t1).
    z = noise(16)
    t0, t1 = 80.0, 0.002
    x0 = z * t0
    x1 = x0 + (t1 - t0) * (x0 - ideal(x0, t0)) / t0
    assert torch.allclose(ddim_sample(ideal, z, num_steps=2, tmin=t1, tmax=t0), ideal(x1, t1))
    # One Heun step then an Euler step to zero.
    d = (x0 - ideal(x0, t0)) / t0
    x_e = x0 + (t1 - t0) * d
    x_h = x0 + (t1 - t0) * (d + (x_e - ideal(x_e, t1)) / t1) / 2
    final = x_h + (0 - t1) * (x_h - ideal(x_h, t1)) / t1
    assert torch.allclose(edm_sample(ideal, z, num_steps=2, tmin=t1, tmax=t0), final)
    assert math.isfinite(final.abs().max().item())
