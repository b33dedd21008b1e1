import math

import pytest
import torch

from dpdm_fast.diffusion import (EDMDenoiser, EDMLoss, VDenoiser, VEDenoiser, VELoss, VLoss, VPDenoiser,
                                 VPLoss, build_loss, drop_labels)
from dpdm_fast.models import NCSNpp


class Recorder(torch.nn.Module):
    """A stand-in network that records its inputs and acts on each row independently."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, y):
        self.calls.append((x, c_noise, y))
        return 0.5 * x


def small_net():
    torch.manual_seed(0)
    return NCSNpp(28, [7], nf=16).eval()


@pytest.mark.parametrize("loss_cls", [EDMLoss, VLoss, VELoss, VPLoss])
def test_loss_shape_and_group_major_layout(loss_cls):
    rec = Recorder()
    loss = loss_cls(n_noise_samples=3, n_classes=10, label_unconditioning_prob=0.0)
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    out = loss(EDMDenoiser(rec), x, y, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4,)
    (x_in, _, y_in), = rec.calls
    assert x_in.shape == (12, 1, 28, 28)
    assert torch.equal(y_in, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))


def test_permuting_an_examples_rows_leaves_its_loss_unchanged():
    net = small_net()
    loss = EDMLoss(n_noise_samples=4, n_classes=10)
    den = EDMDenoiser(net)
    x = torch.randn(3, 1, 28, 28)
    clean, sigma, noise, y = loss.make_rows(x, torch.tensor([1, 2, 3]), torch.Generator().manual_seed(1))
    base = loss.rows_loss(den, clean, sigma, noise, y)
    perm = torch.arange(12)
    perm[4:8] = torch.tensor([7, 5, 4, 6])  # shuffle example 1's rows among themselves
    shuffled = loss.rows_loss(den, clean[perm], sigma[perm], noise[perm], y[perm])
    torch.testing.assert_close(shuffled, base, rtol=1e-5, atol=1e-6)
    # moving a row to another example does change both losses
    swap = torch.arange(12)
    swap[3], swap[4] = 4, 3
    crossed = loss.rows_loss(den, clean[swap], sigma[swap], noise[swap], y[swap])
    assert not torch.allclose(crossed[:2], base[:2], rtol=1e-4)


def test_changing_one_example_changes_only_its_loss():
    net = small_net()
    loss = EDMLoss(n_noise_samples=2, n_classes=10)
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([1, 2, 3, 4])
    a = loss(EDMDenoiser(net), x, y, torch.Generator().manual_seed(5))
    x2 = x.clone()
    x2[2] += 0.5
    b = loss(EDMDenoiser(net), x2, y, torch.Generator().manual_seed(5))
    changed = ~torch.isclose(a, b, rtol=1e-6, atol=0)
    assert changed.tolist() == [False, False, True, False]


def test_reproducible_with_generator():
    net = small_net()
    loss = VLoss(n_noise_samples=2, n_classes=10)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    a = loss(VDenoiser(net), x, y, torch.Generator().manual_seed(3))
    b = loss(VDenoiser(net), x, y, torch.Generator().manual_seed(3))
    c = loss(VDenoiser(net), x, y, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_label_dropout_rate_and_token():
    y = torch.zeros(200_000, dtype=torch.long)
    out = drop_labels(y, 10, 0.1, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 10}
    assert abs((out == 10).float().mean().item() - 0.1) < 0.003
    assert torch.equal(drop_labels(y, 10, 0.0), y)
    with pytest.raises(ValueError, match="n_classes"):
        drop_labels(y, None, 0.1)


def test_label_dropout_is_per_example_not_per_row():
    rec = Recorder()
    loss = EDMLoss(n_noise_samples=8, n_classes=10, label_unconditioning_prob=0.5)
    loss(EDMDenoiser(rec), torch.randn(64, 1, 4, 4), torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(0))
    rows = rec.calls[0][2].reshape(64, 8)
    assert (rows == rows[:, :1]).all()
    assert 0 < (rows[:, 0] == 10).sum() < 64


def test_sigma_distributions():
    g = torch.Generator().manual_seed(0)
    s = EDMLoss().sample_sigma((100_000, 1), g, "cpu")
    assert abs(s.log().mean().item() + 1.2) < 0.02 and abs(s.log().std().item() - 1.2) < 0.02
    v = VLoss()
    s = v.sample_sigma((100_000, 1), g, "cpu")
    logsnr = -2 * s.log()
    assert logsnr.min() >= -9 - 1e-3 and logsnr.max() <= 13 + 1e-3
    assert logsnr.min() < -8.9 and logsnr.max() > 12.5
    ve = VELoss(sigma_min=0.02, sigma_max=100).sample_sigma((100_000, 1), g, "cpu")
    assert ve.min() >= 0.02 - 1e-6 and ve.max() <= 100 + 1e-4


def test_denoiser_coefficients_match_edm_table():
    sigma = torch.tensor([0.01, 0.5, 3.0, 50.0]).reshape(-1, 1, 1, 1)
    rec = Recorder()
    x = torch.randn(4, 1, 2, 2)
    sd = math.sqrt(1 / 3)
    out = EDMDenoiser(rec)(x, sigma)
    c_in = 1 / torch.sqrt(sigma**2 + sd**2)
    expected = sd**2 / (sigma**2 + sd**2) * x + sigma * sd / torch.sqrt(sigma**2 + sd**2) * 0.5 * c_in * x
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(rec.calls[-1][1], 0.25 * sigma.log().reshape(-1))
    VEDenoiser(rec)(x, sigma)
    torch.testing.assert_close(rec.calls[-1][1], torch.log(sigma / 2).reshape(-1))
    vp = VPDenoiser(rec)
    t = torch.tensor([0.1, 0.3, 0.7, 1.0])
    torch.testing.assert_close(vp.time(vp.sigma(t)), t, rtol=1e-4, atol=1e-5)


def test_weights():
    sigma = torch.tensor([0.5, 2.0])
    sd = math.sqrt(1 / 3)
    torch.testing.assert_close(EDMLoss().weight(sigma), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    torch.testing.assert_close(VLoss().weight(sigma), (sigma**2 + 1) / sigma**2)
    torch.testing.assert_close(VPLoss().weight(sigma), 1 / sigma**2)


def test_build_loss_errors():
    assert isinstance(build_loss("v", n_noise_samples=2), VLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("ddpm")
    with pytest.raises(ValueError, match="K"):
        EDMLoss(n_noise_samples=0)


def test_build_loss_from_config_section():
    from dpdm_fast.config import load_config
    cfg = load_config("configs/mnist_28/train_eps_0.2.yaml", ["loss.n_noise_samples=4"])
    loss = build_loss(**cfg.loss)
    assert isinstance(loss, VLoss) and loss.n_noise_samples == 4 and loss.n_classes == 10
    assert loss.t_min == pytest.approx(2 * math.acos(1 / math.sqrt(1 + math.exp(-13))) / math.pi)
    with pytest.raises(ValueError, match="unknown loss options"):
        build_loss("edm", p_meen=1.0)
