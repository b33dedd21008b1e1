"""PrivacyEngine as a drop-in: sampling, batching, accounting, noise, precision, and refusals."""
import warnings

import pytest
import torch
import torch.nn as nn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from dpdm_fast import BatchMemoryManager, PrivacyEngine
from dpdm_fast.engine import DPOptimizer, PrivateModule
from dpdm_fast.engine.reference import per_example_loop_update
from engine_helpers import rel, zero_noise_engine

warnings.filterwarnings("ignore", message="Secure RNG turned off")


class Tiny(nn.Module):
    """Conv + GroupNorm + Embedding + Linear: every rule type, small enough to loop over."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x, y):
        h = torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)) + self.emb(y)
        return self.head(h).squeeze(-1)


def row_losses(model, x, y, target):
    return (model(x, y) - target) ** 2


def expand(x, y, K):
    """K noisy rows per example, group-major (like the DPDM loss). Each row depends only on its
    example and its index k, so splitting a batch into physical batches gives the same rows."""
    k = torch.arange(K, dtype=x.dtype).repeat(x.shape[0]).reshape(-1, 1, 1, 1)
    xr = x.repeat_interleave(K, 0)
    noisy = xr + 0.3 * torch.sin(7 * xr + k)
    target = torch.cos(xr.flatten(1).sum(1)) + k.flatten()
    return noisy, y.repeat_interleave(K), target


def dataset(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 10, (n,), generator=g))


def make(K=2, sigma=0.0, C=1.0, batch=8, n=40, accountant="rdp", **kw):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant=accountant)
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(dataset(n), batch_size=batch),
                                             noise_multiplier=sigma, max_grad_norm=C, noise_multiplicity=K, **kw)
    return engine, model, opt, loader


def test_drop_in_training_loop_runs_and_accounts():
    engine, model, opt, loader = make(K=2, sigma=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in loader:
        row_losses(model, *expand(x, y, 2)).mean().backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps == len(loader) == 5
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert 0 < engine.get_epsilon(1e-5) < float("inf")
    assert "rdp accountant" in engine.privacy_report(1e-5)
    assert set(model.state_dict()) == set(Tiny().state_dict())  # checkpoints without a wrapper prefix


def loop_reference_and_engine(n, K, C, expected):
    """n examples' rows, the per-example-loop update on them, and a fresh zero-noise engine on the same init."""
    x, y = dataset(n)[:]
    rows = expand(x, y, K)
    torch.manual_seed(0)
    reference = per_example_loop_update(Tiny(), row_losses, rows, K, C, expected_batch_size=expected)
    torch.manual_seed(0)
    model = Tiny()
    pm, opt = zero_noise_engine(model, K, C, expected)
    return (x, y), rows, reference, model, pm, opt


def test_physical_batches_equal_one_big_batch():
    K, C = 2, 0.05
    (x, y), rows, reference, model, pm, opt = loop_reference_and_engine(7, K, C, 5)
    bmm = BatchMemoryManager(data_loader=DataLoader(TensorDataset(x, y), batch_size=7), max_physical_batch_size=3,
                             optimizer=opt)
    seen = []
    with bmm as batches:
        for xb, yb in batches:
            seen.append(len(xb))
            row_losses(pm, *expand(xb, yb, K)).mean().backward()
            opt.step()
            if len(seen) < 3:
                opt.zero_grad()  # between physical batches this must not drop the accumulated sums
    assert seen == [3, 2, 2] and opt._steps_taken == 1  # indices split as Opacus does (np.array_split)
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel(ours, reference) < 1e-5
    assert pm.collector.num_examples == 0


def test_multiple_backward_calls_accumulate():
    K, C = 3, 0.1
    _, rows, reference, model, pm, opt = loop_reference_and_engine(5, K, C, 4)
    row_losses(pm, *(r[:2 * K] for r in rows)).mean().backward()
    row_losses(pm, *(r[2 * K:] for r in rows)).mean().backward()
    assert pm.collector.num_examples == 5
    opt.step()
    assert rel(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), reference) < 1e-5


def test_empty_batch_still_noises_steps_and_counts():
    engine, model, opt, loader = make(K=2, sigma=2.0, batch=1, n=40)  # q = 1/40: most batches are empty
    for x, y in loader:
        row_losses(model, *expand(x, y, 2)).mean().backward()
        opt.step()
        if len(x) == 0:
            break
        opt.zero_grad()
    assert len(x) == 0
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert grads.abs().sum() > 0 and engine.steps >= 1
    assert abs(grads.std().item() * opt.expected_batch_size - 2.0) < 0.5


def test_poisson_loader_yields_empty_batches_which_train():
    engine, model, opt, loader = make(K=2, sigma=1.0, batch=1, n=40)  # q = 1/40: many empty batches
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        row_losses(model, *expand(x, y, 2)).mean().backward()
        opt.step()
        opt.zero_grad()
    assert 0 in sizes and engine.steps == 40


def test_accounting_identical_to_opacus():
    for mech in ["rdp", "prv", "gdp"]:
        engine, model, opt, loader = make(K=2, sigma=1.3, accountant=mech)
        for x, y in loader:
            row_losses(model, *expand(x, y, 2)).mean().backward()
            opt.step()
            opt.zero_grad()
        acc = create_accountant(mech)
        for _ in range(5):
            acc.step(noise_multiplier=1.3, sample_rate=1 / 5)
        assert engine.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_make_private_with_epsilon_uses_opacus_search():
    torch.manual_seed(0)
    engine = PrivacyEngine(accountant="rdp")
    model = Tiny()
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.Adam(model.parameters()), data_loader=DataLoader(dataset(40), batch_size=8),
        target_epsilon=3.0, target_delta=1e-5, epochs=10, max_grad_norm=1.0, noise_multiplicity=4)
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=8 / 40, epochs=10, accountant="rdp")
    assert opt.noise_multiplier == pytest.approx(expected)


def test_accountant_state_saves_and_resumes():
    engine, model, opt, loader = make(K=2, sigma=1.0)
    for x, y in loader:
        row_losses(model, *expand(x, y, 2)).mean().backward()
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    resumed = PrivacyEngine(accountant="rdp")
    resumed.load_state_dict(state)
    assert resumed.get_epsilon(1e-5) == engine.get_epsilon(1e-5) and resumed.steps == 5
    resumed.accountant.step(noise_multiplier=1.0, sample_rate=0.2)
    assert resumed.get_epsilon(1e-5) > engine.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="accountant='rdp'"):
        PrivacyEngine(accountant="prv").load_state_dict(state)


def test_noise_mean_and_variance():
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    pm = PrivateModule(model, max_grad_norm=0.7)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm.collector, noise_multiplier=1.5,
                      max_grad_norm=0.7, expected_batch_size=10, generator=torch.Generator().manual_seed(1))
    draws = []
    for _ in range(50):
        pm(torch.zeros(0, 50)).sum().backward()  # empty batch: the update is pure noise
        opt.step()
        draws.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * 10)
    draws = torch.stack(draws)
    std = 1.5 * 0.7
    assert abs(draws.mean().item()) < 0.02 * std * 3
    assert draws.std().item() == pytest.approx(std, rel=0.02)


def test_noise_reproducible_with_generator_and_not_in_secure_mode():
    def run(gen, secure=False):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        pm = PrivateModule(model)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm.collector, noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=1, generator=gen, secure_mode=secure)
        pm(torch.zeros(0, 3)).sum().backward()
        opt.step()
        return model.weight.grad.clone()
    assert torch.equal(run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3)))
    assert not torch.equal(run(None, secure=True), run(None, secure=True))
    with pytest.raises(ValueError, match="secure"):
        run(torch.Generator(), secure=True)


def test_bf16_forward_clips_in_fp32():
    K, C = 2, 0.05
    _, rows, reference, model, pm, opt = loop_reference_and_engine(4, K, C, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = row_losses(pm, *rows).float().mean()
    loss.backward()
    assert pm.collector.clipped_sum.dtype == torch.float32 and pm.collector.last_norms.dtype == torch.float32
    opt.step()
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert rel(ours, reference) < 3e-2
    # every example was clipped to C (norm of each clipped example is C): the total is bounded by B*C/d
    assert ours.norm().item() <= 4 * C / 4 + 1e-4


# -- refusals -----------------------------------------------------------------------------------

def test_rows_not_divisible_by_k():
    engine, model, opt, loader = make(K=3)
    x, y = dataset(4)[:]
    with pytest.raises(ValueError, match="not a multiple of noise_multiplicity K=3"):
        row_losses(model, *expand(x, y, 2)).mean().backward()


def test_batchnorm_refused():
    with pytest.raises(ValueError, match="BatchNorm"):
        PrivateModule(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))


def test_non_finite_gradients_refused():
    engine, model, opt, loader = make(K=1)
    x, y = dataset(4)[:]
    x[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"examples \[1\]"):
        row_losses(model, x, y, torch.zeros(4)).mean().backward()


def test_step_without_backward_refused():
    engine, model, opt, loader = make()
    next(iter(loader))
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()


def test_step_without_poisson_batch_refused():
    engine, model, opt, loader = make(K=1)
    x, y = dataset(4)[:]
    row_losses(model, x, y, torch.zeros(4)).mean().backward()
    with pytest.raises(RuntimeError, match="without a new batch from the data loader"):
        opt.step()  # the batch did not come from the Poisson loader


def test_two_poisson_batches_per_step_refused():
    engine, model, opt, loader = make(K=1)
    it = iter(loader)
    for _ in range(2):
        x, y = next(it)
        row_losses(model, x, y, torch.zeros(len(x))).mean().backward()
    with pytest.raises(RuntimeError, match="2 Poisson batches"):
        opt.step()


def test_iterable_dataset_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3)
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="IterableDataset"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                                     data_loader=DataLoader(Stream(), batch_size=2), noise_multiplier=1,
                                     max_grad_norm=1)


def test_unknown_layer_falls_back_or_refuses_when_strict():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w
    with pytest.warns(UserWarning, match="torch.func"):
        PrivateModule(nn.Sequential(Custom()))
    with pytest.raises(NotImplementedError, match=r"'0'.*\['w'\]"):
        PrivateModule(nn.Sequential(Custom()), strict=True)


def test_fallback_layer_in_a_model_matches_loop():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return torch.sin(x * self.w)
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(3, 3), Custom(), nn.Linear(3, 1))  # noqa: E731
    x = torch.randn(8, 3)
    t = torch.randn(8)
    loss = lambda m, x, t: (m(x).squeeze(-1) - t) ** 2  # noqa: E731
    torch.manual_seed(1)
    ref = per_example_loop_update(build(), loss, (x, t), 2, 0.3, 4)
    torch.manual_seed(1)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, opt = zero_noise_engine(model, 2, 0.3, 4)
    loss(pm, x, t).mean().backward()
    opt.step()
    assert rel(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), ref) < 1e-5


def test_frozen_parameters_are_left_alone():
    torch.manual_seed(0)
    model = Tiny()
    model.emb.weight.requires_grad_(False)
    pm = PrivateModule(model, max_grad_norm=1.0)
    assert sum(p.numel() for p in pm.trainable) == sum(p.numel() for p in model.parameters()) - 44
    x, y = dataset(3)[:]
    row_losses(pm, x, y, torch.zeros(3)).mean().backward()
    assert model.emb.weight.requires_grad is False and model.conv.weight.requires_grad is True


def test_checkpoints_interchangeable_with_the_plain_model():
    from dpdm_fast.diffusion import EDMDenoiser
    from dpdm_fast.models import NCSNpp
    torch.manual_seed(0)
    plain = NCSNpp(28, [7], nf=16)
    torch.manual_seed(1)
    pm = PrivateModule(NCSNpp(28, [7], nf=16))
    assert list(pm.state_dict()) == list(plain.state_dict())
    pm.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(pm.state_dict().values(), plain.state_dict().values()))
    wrapped, reference = EDMDenoiser(pm), EDMDenoiser(plain)
    assert list(wrapped.state_dict()) == list(reference.state_dict())
    wrapped.load_state_dict(reference.state_dict())  # nested: keys without the wrapper's prefix


def test_default_noise_follows_torch_manual_seed_like_opacus():
    def first_update(seed_after_wrapping):
        engine, model, opt, loader = make(K=1, sigma=1.0)  # calls torch.manual_seed(0) first
        torch.manual_seed(seed_after_wrapping)             # as with Opacus, seeding after make_private fixes the noise
        x, y = next(iter(loader))
        row_losses(model, x, y, torch.zeros(len(x))).mean().backward()
        opt.step()
        return model.head.weight.grad.clone()
    assert make()[2].generator is None  # global RNG
    assert torch.equal(first_update(5), first_update(5))
    assert not torch.equal(first_update(5), first_update(6))


def test_a_failed_backward_leaves_the_engine_usable():
    engine, model, opt, loader = make(K=3)
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match="K=3"):
        row_losses(model, *expand(x, y, 2)).mean().backward()
    row_losses(model, *expand(x, y, 3)).mean().backward()
    opt.step()
    assert engine.steps == 1
