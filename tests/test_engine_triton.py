"""The whole engine with backend="triton" (Triton's interpreter on CPU, natively on a GPU) against
Opacus hooks + K-averaging and the per-example loop, as the torch backend is tested; the noise of
the fused pass through the optimizer; and the backend switch's refusals."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import DEVICE, ROOT
from dpdm_fast import BatchMemoryManager, PrivacyEngine
from dpdm_fast.engine import DPOptimizer, PrivateModule
from dpdm_fast.engine.reference import opacus_k_averaged_update, per_example_loop_update
from dpdm_fast.models.layers import NIN
from engine_helpers import celeba_net, dpdm_rows, flat_grad, mnist_net, rel, row_losses, zero_noise_engine

warnings.filterwarnings("ignore", message="Secure RNG turned off")


class SmallUNetParts(nn.Module):
    """One of each layer the kernels cover (3x3 conv, strided conv, 1x1 conv, GroupNorm, NIN, Linear),
    plus an Embedding (a torch rule beside the kernels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.nin = NIN(8, 8)
        self.skip = nn.Conv2d(8, 4, 1)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x, y):
        h = self.down(torch.relu(self.norm(self.conv(x))))
        h = self.skip(h + self.nin(h)).mean(dim=(2, 3)) + self.emb(y)
        return self.head(torch.tanh(h)).squeeze(-1)


def small_rows(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 6, 6, generator=g).repeat_interleave(K, 0)
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    y = torch.randint(0, 10, (B,), generator=g).repeat_interleave(K)
    return x.to(DEVICE), y.to(DEVICE), torch.randn(B * K, generator=g).to(DEVICE)


def small_losses(model, x, y, target):
    return (model(x, y) - target) ** 2


def engine_update(net, losses_of, rows, K, C, expected, reduction="mean", backend="triton"):
    pm, opt = zero_noise_engine(net, K, C, expected, reduction, backend=backend)
    losses = losses_of(pm, *rows)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    opt.step()
    out, norms = flat_grad(net), pm.collector.last_norms
    pm.remove_hooks()
    for p in net.parameters():
        p.grad = None
    return out, norms


@pytest.mark.parametrize("make_net,channels,size,labels,C", [(mnist_net, 1, 28, True, 0.1),
                                                             (celeba_net, 3, 32, False, 1e3)],
                         ids=["mnist28-clipped", "celeba32-unclipped"])
def test_dpdm_network_with_triton_matches_opacus_hooks_with_k_averaging(make_net, channels, size, labels, C):
    K, B = 3, 2
    net = make_net().to(DEVICE)
    loss, rows = dpdm_rows(B, K, channels, size, labels)
    rows = [r.to(DEVICE) if r is not None else None for r in rows]
    ours, norms = engine_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, C, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = opacus_k_averaged_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, C, 4)
    if C < 1:
        assert (norms > C).all()
    assert rel(ours, ref) < 1e-5


def test_triton_matches_the_per_example_loop_with_sum_reduction():
    K, B, C = 3, 4, 1.35
    torch.manual_seed(0)
    rows = small_rows(B, K)
    ref = per_example_loop_update(SmallUNetParts().to(DEVICE), small_losses, rows, K, C, 1)
    torch.manual_seed(0)
    net = SmallUNetParts().to(DEVICE)
    pm, _ = zero_noise_engine(net, K, C, 1, "sum", backend="triton")
    assert {v for k, v in pm.computed_by().items() if k != "emb"} == {"triton kernel"}
    assert pm.computed_by()["emb"] == "torch rule"
    pm.remove_hooks()
    ours, norms = engine_update(net, small_losses, rows, K, C, 1, "sum")
    assert (norms > C).any() and (norms < C).any()      # clipped and unclipped examples
    assert rel(ours, ref) < 1e-5


def _private_loop(backend, physical):
    torch.manual_seed(0)
    net = SmallUNetParts().to(DEVICE)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 10, (24,), generator=g))
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                             data_loader=DataLoader(data, batch_size=12), noise_multiplier=0.0,
                                             max_grad_norm=0.1, noise_multiplicity=2, backend=backend)
    physical_batches = 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as batches:
        for x, y in batches:
            K, x, y = 2, x.to(DEVICE), y.to(DEVICE)
            rows = (x.repeat_interleave(K, 0) + 0.1, y.repeat_interleave(K), torch.zeros(len(x) * K, device=DEVICE))
            small_losses(model, *rows).mean().backward()
            opt.step()
            physical_batches += 1
            if not opt._last_step_skipped:
                return flat_grad(net), physical_batches
            opt.zero_grad()


def test_triton_through_privacy_engine_with_physical_batches_equals_torch():
    """make_private(..., backend="triton"), Poisson batch split into physical batches: the deferred
    clip-sum of each physical batch is folded in before the next one overwrites the buffer."""
    torch_one, n_torch = _private_loop("torch", 100)     # the same seeds draw the same Poisson batch
    triton_split, n_triton = _private_loop("triton", 3)
    assert n_torch == 1 and n_triton >= 3
    assert torch_one.abs().sum() > 0 and rel(triton_split, torch_one) < 1e-5


def test_a_before_noise_hook_sees_the_clipped_sum_and_the_step_is_unchanged():
    def run(hook):
        torch.manual_seed(0)
        net = SmallUNetParts().to(DEVICE)
        pm = PrivateModule(net, noise_multiplicity=2, max_grad_norm=0.1, backend="triton")
        opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), pm.collector, noise_multiplier=1.0,
                          expected_batch_size=3, generator=torch.Generator(DEVICE).manual_seed(7))
        seen = []
        if hook:
            opt.before_noise.append(lambda total: seen.append(total.clone()))
        small_losses(pm, *small_rows(3, 2)).mean().backward()
        opt.step()
        return flat_grad(net), seen
    plain, _ = run(False)
    hooked, seen = run(True)
    assert torch.equal(plain, hooked)              # same seed, same pass: bitwise the same update
    assert seen[0].norm() <= 3 * 0.1 + 1e-5 and seen[0].abs().sum() > 0   # clipped, not yet noised


def test_triton_noise_has_the_right_scale_and_follows_the_generator():
    def steps(gen, n=3, secure=False):
        torch.manual_seed(0)
        model = nn.Linear(300, 100).to(DEVICE)
        pm = PrivateModule(model, max_grad_norm=0.7, backend="triton")
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm.collector, noise_multiplier=1.5,
                          max_grad_norm=0.7, expected_batch_size=10, generator=gen, secure_mode=secure)
        out = []
        for _ in range(n):
            pm(torch.zeros(0, 300, device=DEVICE)).sum().backward()   # empty batch: the update is pure noise
            opt.step()
            out.append(flat_grad(model) * 10)
        return torch.stack(out)
    a = steps(torch.Generator(DEVICE).manual_seed(1))
    std = 1.5 * 0.7
    assert abs(a.mean().item()) < 5 * std / a.numel() ** 0.5 and a.std().item() == pytest.approx(std, rel=0.02)
    assert torch.equal(a, steps(torch.Generator(DEVICE).manual_seed(1)))        # same seed: same noise
    assert abs(torch.corrcoef(a[:2])[0, 1].item()) < 0.05                 # consecutive steps: fresh noise
    s = steps(None, n=2, secure=True)                                     # 4 draws / 2, OS-seeded
    assert s.std().item() == pytest.approx(std, rel=0.03)
    assert not torch.equal(s, steps(None, n=2, secure=True))


def test_triton_with_bf16_autocast_clips_in_fp32():
    K, C = 2, 0.05
    torch.manual_seed(0)
    rows = small_rows(4, K)
    ref = per_example_loop_update(SmallUNetParts().to(DEVICE), small_losses, rows, K, C, 4)
    torch.manual_seed(0)
    net = SmallUNetParts().to(DEVICE)
    pm, opt = zero_noise_engine(net, K, C, 4, backend="triton")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = small_losses(pm, *rows).float().mean()
    loss.backward()
    opt.step()
    ours = flat_grad(net)
    assert pm.collector.last_norms.dtype == torch.float32 and ours.dtype == torch.float32
    assert rel(ours, ref) < 3e-2 and ours.norm().item() <= 4 * C / 4 + 1e-4


def test_unknown_and_unavailable_backends_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        PrivateModule(nn.Linear(2, 2), backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="model is on cpu"):
            PrivateModule(nn.Linear(2, 2), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_on_cpu_without_the_interpreter_is_refused():
    code = ("import torch.nn as nn\nfrom dpdm_fast.engine import PrivateModule\n"
            "try:\n    PrivateModule(nn.Linear(2, 2), backend='triton')\nexcept RuntimeError as e:\n    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stderr


def test_triton_missing_is_an_error_not_a_fallback(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(RuntimeError, match="Triton, which is not installed"):
        PrivateModule(nn.Linear(2, 2), backend="triton")
    assert PrivateModule(nn.Linear(2, 2), backend="auto").backend == "torch"   # CPU: torch, no Triton needed


def test_triton_per_layer_clipping_and_grad_sample_views_match_torch():
    """Per-layer bounds (the torch reference sum, then the fused noise pass) and the Opacus views."""
    K, B = 2, 3
    torch.manual_seed(0)
    rows = small_rows(B, K)
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        net = SmallUNetParts().to(DEVICE)
        bounds = [0.01 * (i + 1) for i in range(len(list(net.parameters())))]
        from dpdm_fast.engine import DPOptimizer, PrivateModule
        pm = PrivateModule(net, noise_multiplicity=K, max_grad_norm=bounds, loss_reduction="mean", backend=backend)
        opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), pm.collector, noise_multiplier=0.0,
                          expected_batch_size=B)
        small_losses(pm, *rows).mean().backward()
        samples = [p.grad_sample.clone() for p in net.parameters()]
        opt.step()
        results[backend] = (flat_grad(net), samples)
    assert rel(results["triton"][0], results["torch"][0]) < 1e-5
    for a, b in zip(results["triton"][1], results["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
