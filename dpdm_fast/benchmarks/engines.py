"""One training step (forward, backward, clip, noise, Adam) per engine, all on the same model and rows.

Every engine trains the same network on the same B examples x K rows (group-major): for the diffusion
workloads K noisy copies of each image; for ``lstm_lm`` (a next-token language model with an embedding
tied to its output layer, Opacus's DPLSTM in between: the "transformer-style" workload, whose
parameters are used at every time step) K copies of each token sequence.
  nonprivate    plain Adam on the mean loss: the floor
  dpdm_fast     this engine, torch backend (one gradient per example, the K-sum inside the GEMM);
                dpdm_fast_triton / dpdm_fast_cuda: the same with the fused kernels (GPU only)
  opacus_kavg   Opacus 1.6 'hooks': B*K per-row gradients, averaged per example, clipped (what DPDM ran)
  opacus_ghost  Opacus 1.6 ghost clipping: clips each ROW, not each group of K rows, so it is a
                different algorithm (a weaker privacy unit); a speed reference only
  functorch     torch.func vmap of per-group gradients, then the same clip and noise
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..diffusion import EDMDenoiser, EDMLoss
from ..models import NCSNpp

C, SIGMA, LR = 1.0, 1.0, 1e-4


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    make_net: Callable[[], nn.Module]
    channels: int = 0
    size: int = 0
    labels: bool = False
    task: str = "diffusion"    # or "lm": rows are token sequences (see make_batch)


class TiedLSTMLM(nn.Module):
    """Next-token LM: embedding -> Opacus DPLSTM -> output layer sharing the embedding's weight."""

    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 1):
        super().__init__()
        from opacus.layers import DPLSTM
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = DPLSTM(dim, dim, num_layers=layers, batch_first=True)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        h, _ = self.lstm(self.emb(tokens))
        return self.out(h)


WORKLOADS = {
    "mnist": Workload("mnist", "DPDM MNIST net (1.75M params, 28x28, conditional)",
                      lambda: NCSNpp(28, [7]), 1, 28, True),
    "small": Workload("small", "small MNIST net (nf=16, one residual block per level, no attention, 28x28, conditional)",
                      lambda: NCSNpp(28, [], nf=16, num_res_blocks=1), 1, 28, True),
    "celeba": Workload("celeba", "DPDM CelebA-32 net (1.80M params, 32x32, unconditional)",
                       lambda: NCSNpp(32, [16, 8], num_in_channels=3, num_out_channels=3, label_dim=0,
                                      use_cfg=False), 3, 32, False),
    "lstm_lm": Workload("lstm_lm", "LSTM language model with tied embedding/output (vocab 256, dim 128, "
                        "sequences of 32 tokens; Opacus DPLSTM)", TiedLSTMLM, task="lm"),
}
LM_SEQUENCE = 32


class DiffusionRows:
    """Per-row EDM losses of a denoiser on (clean, sigma, noise, labels) rows."""

    def __init__(self, loss: EDMLoss):
        self.loss = loss

    def __call__(self, model, clean, sigma, noise, y) -> torch.Tensor:
        return row_losses(self.loss, model, clean, sigma, noise, y)


def lm_row_losses(model, tokens) -> torch.Tensor:
    """Per-row next-token cross-entropy, averaged over the positions of the row."""
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


def make_batch(w: Workload, B: int, K: int, device: torch.device, seed: int = 0):
    """(loss of rows: (model, *rows) -> (B*K,) per-row losses, the rows)."""
    if w.task == "lm":
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 256, (B, LM_SEQUENCE + 1), generator=g).repeat_interleave(K, 0)
        return lm_row_losses, (tokens.to(device),)
    loss, rows = make_rows(w, B, K, device, seed)
    return DiffusionRows(loss), rows


def make_rows(w: Workload, B: int, K: int, device: torch.device, seed: int = 0):
    loss = EDMLoss(n_noise_samples=K, n_classes=10 if w.labels else None)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, w.channels, w.size, w.size, generator=g) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=g) if w.labels else None
    rows = tuple(None if r is None else r.to(device) for r in loss.make_rows(x, y, g))
    return loss, rows


def row_losses(loss: EDMLoss, model: nn.Module, clean, sigma, noise, y) -> torch.Tensor:
    pred = EDMDenoiser(model)(clean + sigma * noise, sigma, y)
    return (loss.weight(sigma) * (pred - clean) ** 2).reshape(clean.shape[0], -1).mean(1)


def _nonprivate(net, loss_fn, rows, B, K, device):
    opt = torch.optim.Adam(net.parameters(), lr=LR)

    def step():
        loss_fn(net, *rows).mean().backward()
        opt.step()
        opt.zero_grad()
    return step


def _dpdm_fast(backend):
    def build(net, loss_fn, rows, B, K, device):
        from ..engine import DPOptimizer, PrivateModule
        pm = PrivateModule(net, noise_multiplicity=K, max_grad_norm=C, backend=backend,
                           grad_sample_views=False)   # as the trainer runs it
        opt = DPOptimizer(torch.optim.Adam(net.parameters(), lr=LR), pm.collector, noise_multiplier=SIGMA,
                          max_grad_norm=C, expected_batch_size=B, generator=torch.Generator(device).manual_seed(0))

        def step():
            loss_fn(pm, *rows).mean().backward()
            opt.step()
            opt.zero_grad()
        return step
    return build


def _noise_and_step(params, per_example, B, opt, gen):
    """Flat clipping of per-example gradient lists, noise, Adam (shared by the baselines)."""
    norms = torch.stack([g.reshape(B, -1).norm(dim=1) for g in per_example], 1).norm(dim=1)
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, per_example):
        total = torch.einsum("b,b...->...", factors, g)
        p.grad = (total + SIGMA * C * torch.randn(total.shape, generator=gen, device=total.device)) / B
    opt.step()
    opt.zero_grad()


def _opacus_kavg(net, loss_fn, rows, B, K, device):
    from opacus import GradSampleModule
    gsm = GradSampleModule(net, loss_reduction="mean")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        loss_fn(gsm, *rows).mean().backward()
        per_example = [p.grad_sample.reshape(B, K, *p.shape).mean(1) for p in params]
        for p in params:
            p.grad_sample = None
        _noise_and_step(params, per_example, B, opt, gen)
    return step


class _RowCriterion:
    """criterion(pred, clean, weight) -> per-row weighted squared error (Opacus ghost API)."""
    reduction = "mean"

    def __call__(self, pred, clean, weight):
        per_row = (weight * (pred - clean) ** 2).reshape(pred.shape[0], -1).mean(1)
        return per_row if self.reduction == "none" else per_row.mean()


def _opacus_ghost(net, loss_fn, rows, B, K, device):
    if not isinstance(loss_fn, DiffusionRows):
        raise NotImplementedError("opacus_ghost is wired for the diffusion workloads only")
    loss = loss_fn.loss
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    gsm = GradSampleModuleFastGradientClipping(net, max_grad_norm=C, use_ghost_clipping=True, loss_reduction="mean")
    opt = DPOptimizerFastGradientClipping(torch.optim.Adam(net.parameters(), lr=LR), noise_multiplier=SIGMA,
                                          max_grad_norm=C, expected_batch_size=B * K, loss_reduction="mean")
    criterion = DPLossFastGradientClipping(gsm, opt, _RowCriterion(), "mean")
    clean, sigma, noise, y = rows

    def step():
        pred = EDMDenoiser(gsm)(clean + sigma * noise, sigma, y)
        criterion(pred, clean, loss.weight(sigma)).backward()
        opt.step()
        opt.zero_grad()
    return step


def _functorch(net, loss_fn, rows, B, K, device):
    from torch.func import functional_call, grad, vmap
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator(device).manual_seed(0)

    def group_loss(p, *group_rows):
        model = lambda *args: functional_call(net, p, args)  # noqa: E731
        return loss_fn(model, *group_rows).mean()

    def step():
        p = {n: t.detach() for n, t in zip(names, params)}
        grouped = [None if r is None else r.reshape(B, K, *r.shape[1:]) for r in rows]
        in_dims = (None,) + tuple(None if r is None else 0 for r in grouped)
        per_example = vmap(grad(group_loss), in_dims=in_dims)(p, *grouped)
        _noise_and_step(params, [per_example[n] for n in names], B, opt, gen)
    return step


ENGINES: dict[str, tuple[Callable, str]] = {
    "nonprivate": (_nonprivate, "non-private Adam (floor)"),
    "dpdm_fast": (_dpdm_fast("torch"), "dpdm_fast, torch backend"),
    "dpdm_fast_triton": (_dpdm_fast("triton"), "dpdm_fast, Triton kernels (GPU)"),
    "dpdm_fast_cuda": (_dpdm_fast("cuda"), "dpdm_fast, CUDA C++ kernels (GPU)"),
    "opacus_kavg": (_opacus_kavg, "Opacus 1.6 hooks + K-averaging (DPDM's method)"),
    "opacus_ghost": (_opacus_ghost, "Opacus 1.6 ghost, clips per ROW: not the same algorithm"),
    "functorch": (_functorch, "torch.func vmap per-group grads"),
}


def build_engine(engine: str, workload: str, B: int, K: int, device: str | torch.device = "cpu", seed: int = 0):
    """(step function, parameter count) for one engine on one workload and batch."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {sorted(ENGINES)}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {sorted(WORKLOADS)}")
    device = torch.device(device)
    w = WORKLOADS[workload]
    torch.manual_seed(seed)
    net = w.make_net().to(device)
    loss_fn, rows = make_batch(w, B, K, device, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = ENGINES[engine][0](net, loss_fn, rows, B, K, device)
    return step, sum(p.numel() for p in net.parameters())
