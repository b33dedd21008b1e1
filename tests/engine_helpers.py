"""Shared pieces for the engine tests: small DPDM rows and flat gradients."""
import torch

from dpdm_fast.diffusion import EDMDenoiser, EDMLoss
from dpdm_fast.models import NCSNpp


def perturbed(net, seed=0, scale=0.02):
    """Freshly initialised DPDM nets have near-zero output convs; perturb so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def mnist_net(seed=0):
    torch.manual_seed(seed)
    return perturbed(NCSNpp(28, [7]), seed)


def celeba_net(seed=0):
    torch.manual_seed(seed)
    return perturbed(NCSNpp(32, [16, 8], num_in_channels=3, num_out_channels=3, label_dim=0, use_cfg=False), seed)


def dpdm_rows(B, K, channels=1, size=28, labels=True, seed=0):
    loss = EDMLoss(n_noise_samples=K, n_classes=10 if labels else None)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, channels, size, size, generator=g) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=g) if labels else None
    return loss, loss.make_rows(x, y, g)


def row_losses(loss, model, clean, sigma, noise, y):
    pred = EDMDenoiser(model)(clean + sigma * noise, sigma, y)
    return (loss.weight(sigma) * (pred - clean) ** 2).reshape(clean.shape[0], -1).mean(1)


def flat_grad(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.requires_grad])


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def zero_noise_engine(model, K=1, C=1.0, expected=1, reduction="mean", **kw):
    """A private module and a noise-free DP optimizer (SGD, lr 0): p.grad after step() is the clipped update."""
    from dpdm_fast.engine import DPOptimizer, PrivateModule
    pm = PrivateModule(model, noise_multiplicity=K, max_grad_norm=C, loss_reduction=reduction, **kw)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm.collector, noise_multiplier=0.0,
                      max_grad_norm=C, expected_batch_size=expected, loss_reduction=reduction)
    return pm, opt
