"""Regression tests: no path through the public API gives a weaker guarantee than the one printed.

Each test is one way a careful user or an adversarial reviewer could end up with gradients that are
not the clipped, noised per-example update the accountant assumes; each must be refused with a
clear error or be computed correctly (checked against the per-example autograd loop).
"""
import collections
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.validators.errors import UnsupportedModuleError
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from dpdm_fast import BatchMemoryManager, PrivacyEngine
from dpdm_fast.engine import PrivateModule, register_rule
from dpdm_fast.engine.reference import per_example_loop_update
from engine_helpers import rel, zero_noise_engine

warnings.filterwarnings("ignore", message="Secure RNG turned off")


class Net(nn.Module):
    """conv -> relu -> GroupNorm -> linear; `checkpointed` runs the conv block under torch.utils.checkpoint."""

    def __init__(self, inplace=False, checkpointed=None):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 1)
        self.checkpointed = checkpointed

    def block(self, x):
        return self.norm(self.act(self.conv(x)))

    def forward(self, x):
        if self.checkpointed is None:
            h = self.block(x)
        else:
            h = checkpoint(self.block, x, use_reentrant=self.checkpointed == "reentrant")
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)


def row_losses(model, x, t):
    return (model(x) - t) ** 2


def rows(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B * K, 1, 5, 5, generator=g), torch.randn(B * K, generator=g)


def flat(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def reference(build, K, C, expected, data, loss=row_losses, seed=0):
    torch.manual_seed(seed)
    return per_example_loop_update(build(), loss, data, K, C, expected)


def fresh(build, seed=0):
    torch.manual_seed(seed)
    return build()


def loader_engine(model, K=1, C=1.0, sigma=0.0, n=24, batch=6, **kw):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 5, 5, generator=g), torch.randn(n, generator=g))
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pm, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=batch),
                                          noise_multiplier=sigma, max_grad_norm=C, noise_multiplicity=K, **kw)
    return engine, pm, opt, loader


def grouped(data, K):
    """A dataset of examples, each holding its K rows (the loss flattens them back, group-major)."""
    x, t = data
    return TensorDataset(x.reshape(-1, K, *x.shape[1:]), t.reshape(-1, K))


def expand(x, t, K):
    return x.repeat_interleave(K, 0) + 0.1 * torch.arange(K * len(x)).reshape(-1, 1, 1, 1).float().sin(), \
        t.repeat_interleave(K)


# -- 1. one source of truth -----------------------------------------------------------------------

def test_make_private_again_rebuilds_with_the_new_clip_norm_and_k():
    K, C, data = 2, 0.05, rows(3, 2)
    model = fresh(Net)
    _, pm, opt, _ = loader_engine(model, K=1, C=1.0)
    engine = PrivacyEngine(accountant="rdp")
    pm2, opt2, loader2 = engine.make_private(module=pm, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                             data_loader=DataLoader(grouped(data, K), batch_size=3),
                                             noise_multiplier=0.0, max_grad_norm=C, noise_multiplicity=K,
                                             poisson_sampling=False)
    assert pm2.noise_multiplicity == K and opt2.max_grad_norm == C
    for x, t in loader2:      # 3 examples, 6 rows
        row_losses(pm2, x.flatten(0, 1), t.flatten()).mean().backward()
    opt2.step()
    assert rel(flat(model), reference(Net, K, C, 3, data)) < 1e-5
    with pytest.raises(RuntimeError, match="make_private"):
        pm(data[0])  # the first wrapper is detached and says so


def test_setting_optimizer_max_grad_norm_changes_clipping_and_noise():
    K, data = 2, rows(3, 2)
    model = fresh(Net)
    pm, opt = zero_noise_engine(model, K, 1.0, 3)
    opt.max_grad_norm = 0.03        # what Opacus's clipping schedulers do
    assert pm.collector.max_grad_norm == 0.03 and pm.max_grad_norm == 0.03
    row_losses(pm, *data).mean().backward()
    assert (pm.collector.last_norms > 0.03).all()
    opt.step()
    assert rel(flat(model), reference(Net, K, 0.03, 3, data)) < 1e-5
    row_losses(pm, *data).mean().backward()
    with pytest.raises(RuntimeError, match="only after optimizer.step"):
        opt.max_grad_norm = 0.5     # mid-step: examples of one step would be clipped to different norms


def test_opacus_clipping_scheduler_drives_both():
    from opacus.schedulers import StepGradClip
    model = fresh(Net)
    _, pm, opt, loader = loader_engine(model, C=1.0)
    sched = StepGradClip(opt, step_size=1, gamma=0.5)
    for x, t in loader:
        row_losses(pm, x, t).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        break
    assert opt.max_grad_norm == 0.5 and pm.collector.max_grad_norm == 0.5


def test_noise_multiplicity_and_reduction_are_read_only_views():
    pm, opt = zero_noise_engine(fresh(Net), 3, 1.0, 2)
    assert pm.noise_multiplicity == 3 and opt.loss_reduction == "mean"
    with pytest.raises(AttributeError):
        pm.noise_multiplicity = 1
    with pytest.raises(ValueError, match="differs"):
        from dpdm_fast.engine import DPOptimizer
        DPOptimizer(torch.optim.SGD(pm.parameters(), lr=0.1), pm.collector, noise_multiplier=1.0,
                    max_grad_norm=2.0, expected_batch_size=1)


# -- 2. trainable parameters checked at every forward ---------------------------------------------

def test_parameter_unfrozen_after_wrapping_is_refused():
    model = fresh(Net)
    model.head.bias.requires_grad_(False)
    pm, opt = zero_noise_engine(model, 1, 1.0, 2)
    model.head.bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match="'head.bias'.*not trainable when the model was wrapped"):
        pm(rows(2, 1)[0])


def test_parameter_frozen_after_wrapping_stays_frozen_and_is_not_updated():
    K, C, data = 2, 0.05, rows(3, 2)

    def build():
        m = Net()
        m.conv.weight.requires_grad_(False)
        return m
    expected = reference(build, K, C, 3, data)
    model = fresh(Net)
    pm, opt = zero_noise_engine(model, K, C, 3)
    model.conv.weight.requires_grad_(False)       # frozen after wrapping
    row_losses(pm, *data).mean().backward()
    assert model.conv.weight.requires_grad is False
    opt.step()
    assert model.conv.weight.grad is None
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    assert rel(ours, expected) < 1e-5             # clipping is over the trainable parameters only


def test_freezing_in_the_middle_of_a_step_is_refused():
    pm, opt = zero_noise_engine(fresh(Net), 1, 1.0, 2)
    row_losses(pm, *rows(2, 1)).mean().backward()
    pm.head.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="middle of a step"):
        pm(rows(2, 1)[0])


# -- 3. every step folds in exactly its Poisson batch, each example clipped once ------------------

def test_k_rows_per_example_with_default_noise_multiplicity_is_refused():
    _, pm, opt, loader = loader_engine(fresh(Net), n=40, batch=10)
    x, t = next(iter(loader))
    row_losses(pm, *expand(x, t, 4)).mean().backward()
    with pytest.raises(RuntimeError, match="noise_multiplicity=4"):
        opt.step()


def test_two_backward_passes_over_one_batch_are_refused_and_the_next_step_is_accepted():
    engine, pm, opt, loader = loader_engine(fresh(Net), n=40, batch=10)
    it = iter(loader)
    x, t = next(it)
    row_losses(pm, x, t).mean().backward()
    row_losses(pm, x, t).mean().backward()
    with pytest.raises(RuntimeError, match="clipped .* examples but its batch has"):
        opt.step()
    assert engine.steps == 0 and pm.collector.num_examples == 0   # refused step released nothing
    opt.zero_grad()
    x, t = next(it)
    row_losses(pm, x, t).mean().backward()
    opt.step()                                                     # the next correct step is accepted
    assert engine.steps == 1


def test_autograd_grad_for_inputs_leaves_the_engine_untouched():
    K, C, data = 2, 0.05, rows(3, 2)
    model = fresh(Net)
    pm, opt = zero_noise_engine(model, K, C, 3)
    x = data[0].clone().requires_grad_(True)
    saliency, = torch.autograd.grad(row_losses(pm, x, data[1]).sum(), x)
    plain = fresh(Net)
    x2 = data[0].clone().requires_grad_(True)
    expected, = torch.autograd.grad(row_losses(plain, x2, data[1]).sum(), x2)
    assert torch.allclose(saliency, expected, atol=1e-6)
    assert pm.collector.num_examples == 0 and pm.collector.clipped_sum.abs().sum() == 0
    row_losses(pm, *data).mean().backward()
    opt.step()
    assert rel(flat(model), reference(Net, K, C, 3, data)) < 1e-5


def test_gradient_penalty_with_create_graph_is_refused():
    pm, opt = zero_noise_engine(fresh(Net), 1, 1.0, 2)
    x = rows(2, 1)[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(pm(x).sum(), x, create_graph=True)


def test_non_reentrant_checkpoint_matches_the_loop():
    K, C, data = 2, 0.05, rows(3, 2)
    model = fresh(lambda: Net(checkpointed="non-reentrant"))
    pm, opt = zero_noise_engine(model, K, C, 3)
    row_losses(pm, *data).mean().backward()
    opt.step()
    assert rel(flat(model), reference(Net, K, C, 3, data)) < 1e-5


def test_reentrant_checkpoint_is_refused():
    pm, opt = zero_noise_engine(fresh(lambda: Net(checkpointed="reentrant")), 1, 1.0, 2)
    x, t = rows(2, 1)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        row_losses(pm, x.requires_grad_(True), t).mean().backward()


# -- 4. rules only where they are correct --------------------------------------------------------

class StandardisedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


@pytest.mark.parametrize("conv_cls", [StandardisedConv, ScaledConvForward])
def test_subclass_overriding_forward_gets_the_fallback_not_the_base_rule(conv_cls):
    K, C, data = 2, 0.05, rows(3, 2)

    def build():
        m = Net()
        m.conv = conv_cls(1, 4, 3, padding=1)
        return m
    model = fresh(build)
    with pytest.warns(UserWarning, match="torch.func"):
        pm, opt = zero_noise_engine(model, K, C, 3)
    row_losses(pm, *data).mean().backward()
    opt.step()
    assert rel(flat(model), reference(build, K, C, 3, data)) < 1e-5


def test_parameter_used_outside_its_module_is_refused():
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)
    model = Outside()
    pm, opt = zero_noise_engine(model, 1, 1.0, 2)
    with pytest.raises(RuntimeError, match="'lin.weight' received an ordinary"):
        pm(torch.randn(4, 3)).sum().backward()
    assert model.lin.weight.grad is None


def test_parametrizations_and_weight_norm_are_refused():
    lin = nn.Linear(3, 3)
    nn.utils.parametrize.register_parametrization(lin, "weight", nn.Identity())
    with pytest.raises(UnsupportedModuleError, match="parametrization"):
        PrivateModule(nn.Sequential(lin))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old_style = nn.utils.weight_norm(nn.Linear(3, 3))
    with pytest.raises(UnsupportedModuleError, match="weight_norm"):
        PrivateModule(nn.Sequential(old_style))
    with pytest.raises(UnsupportedModuleError, match="parametrization"):
        PrivateModule(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))))


class Gated(nn.Module):
    """No rule: torch.func fallback, with a per-row tensor keyword and a non-tensor keyword."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, h, gate=None, power=1):
        return (h * self.w) ** power * gate[:, None]


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.gated = Gated()

    def forward(self, x, gate_len=None):
        h = self.lin(x)
        gate = torch.sigmoid(x[:, 0]) if gate_len is None else torch.ones(gate_len)
        return self.gated(h, gate=gate, power=2).sum(-1)


def test_fallback_passes_keyword_arguments_through():
    K, C = 2, 0.3
    x, t = torch.randn(8, 3), torch.randn(8)
    loss = lambda m, x, t: (m(x) - t) ** 2  # noqa: E731
    expected = reference(GatedNet, K, C, 4, (x, t), loss)
    model = fresh(GatedNet)
    with pytest.warns(UserWarning, match="torch.func"):
        pm, opt = zero_noise_engine(model, K, C, 4)
    loss(pm, x, t).mean().backward()
    opt.step()
    assert rel(flat(model), expected) < 1e-5
    with pytest.raises(NotImplementedError, match="not the 8 rows"):
        pm(x, gate_len=1)  # a broadcast constant: not per-row, so not guessed


def test_rule_output_shape_is_checked_before_it_is_written():
    class Odd(nn.Linear):
        pass

    @register_rule(Odd)
    def broadcasting_rule(module, inputs, g, K):   # the whole batch's gradient for every example: wrong
        return {"weight": (g.t() @ inputs[0])[None], "bias": g.sum(0)[None]}
    pm, opt = zero_noise_engine(nn.Sequential(Odd(3, 2)), 1, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"shape \(1, 2, 3\), expected \(4, 2, 3\)"):
        pm(torch.randn(4, 3)).sum().backward()


@pytest.mark.parametrize("kw,match", [({"scale_grad_by_freq": True}, "mixes examples"), ({"max_norm": 1.0}, "max_norm")])
def test_unsupported_embedding_options_are_refused_at_wrap_time(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        PrivateModule(nn.Sequential(nn.Embedding(5, 3, **kw)))


def test_unbatched_input_to_a_rule_layer_is_refused():
    pm, opt = zero_noise_engine(nn.Linear(3, 3), 1, 1.0, 1)
    with pytest.raises(ValueError, match="batched input"):
        pm(torch.randn(3))


# -- 5. saved activations ------------------------------------------------------------------------

def test_in_place_change_of_a_layer_input_after_it_ran_is_detected():
    class Mutating(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 1)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            out = self.b(h)
            h.mul_(2)   # b's saved input is now wrong
            return out
    pm, opt = zero_noise_engine(Mutating(), 1, 1.0, 1)
    with pytest.raises(RuntimeError, match="'b'.*modified in place"):
        pm(torch.randn(4, 3)).sum().backward()


def test_inplace_relu_after_a_conv_matches_the_loop():
    K, C, data = 2, 0.05, rows(3, 2)
    model = fresh(lambda: Net(inplace=True))
    pm, opt = zero_noise_engine(model, K, C, 3)
    row_losses(pm, *data).mean().backward()
    opt.step()
    assert rel(flat(model), reference(Net, K, C, 3, data)) < 1e-5


# -- 6. sampling is what the accountant assumes ---------------------------------------------------

def _indexed(n):
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 5, 5).clone(),
                         torch.zeros(n))


def test_subset_random_sampler_is_sampled_from_its_subset():
    model = fresh(Net)
    holdout = list(range(0, 100, 2))
    with pytest.warns(UserWarning, match="SubsetRandomSampler selects 50 of 100"):
        pm, opt, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_indexed(100), batch_size=10, sampler=SubsetRandomSampler(holdout)),
            noise_multiplier=1.0, max_grad_norm=1.0)
    seen = set()
    for x, _ in loader:
        seen |= set(x[:, 0, 0, 0].long().tolist())
    assert seen and seen <= set(holdout)
    assert len(loader.dataset) == 50 and loader.sample_rate == 1 / 5


@pytest.mark.parametrize("kw", [dict(sampler=WeightedRandomSampler([1.0] * 20, 20)),
                                dict(batch_sampler=[[0, 1], [2, 3]])])
def test_custom_samplers_are_refused(kw):
    model = fresh(Net)
    with pytest.raises(ValueError, match="sampler"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(_indexed(20), **({"batch_size": 4} if "sampler" in kw else {}), **kw),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_accountant_uses_the_samplers_exact_rate_and_epsilon_meets_its_target():
    n, batch, epochs, target = 1860, 20, 3, 2.0   # 93 batches per epoch, and int(1 / (1 / 93)) == 92 in floats
    model = fresh(Net)
    engine = PrivacyEngine(accountant="rdp")
    pm, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_indexed(n), batch_size=batch), target_epsilon=target, target_delta=1e-5,
        epochs=epochs, max_grad_norm=1.0)
    assert engine.sample_rate == loader.batch_sampler.sample_rate == 1 / 93 and len(loader) == 93
    for _ in range(epochs * len(loader)):
        opt.step_hooks[0](opt)   # what each step adds to the ledger
    assert engine.get_epsilon(1e-5) <= target + 0.01


def test_secure_mode_reseeds_the_poisson_sampler_every_batch(monkeypatch):
    import os
    calls = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: calls.append(n) or real(n))
    model = fresh(Net)
    _, _, loader = PrivacyEngine(secure_mode=True).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_indexed(40), batch_size=10), noise_multiplier=1.0, max_grad_norm=1.0)
    before = len(calls)
    seeds = []
    for _ in loader:
        seeds.append(loader.batch_sampler.generator.initial_seed())
    assert len(calls) - before == 4 and len(set(seeds)) == 4


# -- 7. failure semantics ------------------------------------------------------------------------

def test_second_backward_with_retain_graph_is_refused():
    pm, opt = zero_noise_engine(fresh(Net), 1, 1.0, 2)
    loss = row_losses(pm, *rows(2, 1)).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same forward"):
        loss.backward()


def test_an_exception_in_any_backward_node_leaves_the_engine_usable():
    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise ValueError("boom")

    class Fragile(Net):
        fail = True

        def forward(self, x):
            h = self.norm(self.act(self.conv(x)))
            h = Fails.apply(h) if self.fail else h
            return self.head(h.mean(dim=(2, 3))).squeeze(-1)
    K, C, data = 2, 0.05, rows(3, 2)
    model = fresh(Fragile)
    pm, opt = zero_noise_engine(model, K, C, 3)
    with pytest.raises(ValueError, match="boom"):   # head's rule already ran, conv's never will
        row_losses(pm, *data).mean().backward()
    model.fail = False
    row_losses(pm, *data).mean().backward()
    opt.step()
    assert rel(flat(model), reference(Net, K, C, 3, data)) < 1e-5


def test_calling_the_unwrapped_model_is_a_clear_error_except_under_no_grad():
    model = fresh(Net)
    pm, opt = zero_noise_engine(model, 1, 1.0, 2)
    x = rows(2, 1)[0]
    with pytest.raises(RuntimeError, match="call the private module"):
        model(x)
    with pytest.raises(RuntimeError, match="called directly"):
        model.conv(x)
    with torch.no_grad():
        assert torch.allclose(model(x), pm(x))


# -- 8. Opacus compatibility -----------------------------------------------------------------------

def test_dp_optimizer_is_an_optimizer_and_lr_schedulers_work():
    model = fresh(Net)
    _, pm, opt, loader = loader_engine(model, sigma=1.0)
    opt.param_groups[0]["lr"] = 0.1
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, t in loader:
        row_losses(pm, x, t).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** len(loader))


Pair = collections.namedtuple("Pair", "image target")


@pytest.mark.parametrize("collate", ["dict", "namedtuple", "strings"])
def test_batch_memory_manager_splits_any_batch_type(collate):
    def collate_fn(items):
        x = torch.stack([i[0] for i in items]) if items else torch.zeros(0, 1, 5, 5)
        t = torch.stack([i[1] for i in items]) if items else torch.zeros(0)
        if collate == "dict":
            return {"image": x, "target": t}
        if collate == "namedtuple":
            return Pair(x, t)
        return x, t, [f"id{int(v)}" for v in x[:, 0, 0, 0]]
    model = fresh(Net)
    engine = PrivacyEngine(accountant="rdp")
    pm, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          data_loader=DataLoader(_indexed(40), batch_size=10, collate_fn=collate_fn),
                                          noise_multiplier=1.0, max_grad_norm=1.0)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as batches:
        assert len(batches) >= len(loader)
        for batch in batches:
            if collate == "dict":
                x, t = batch["image"], batch["target"]
            elif collate == "namedtuple":
                assert isinstance(batch, Pair)
                x, t = batch
            else:
                x, t, names = batch
                assert len(names) == len(x)
            assert len(x) <= 3
            row_losses(pm, x, t).mean().backward()
            opt.step()
            opt.zero_grad()
    assert engine.steps == len(loader)


def test_accumulation_without_poisson_divides_and_accounts_as_opacus():
    K, C, data = 1, 0.05, rows(6, 1)
    model = fresh(Net)
    engine = PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        pm, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                              data_loader=DataLoader(TensorDataset(*data), batch_size=3),
                                              noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False)
    for x, t in loader:                      # two batches accumulated, one step
        row_losses(pm, x, t).mean().backward()
    opt.step()
    assert opt.accumulated_iterations == 2
    assert rel(flat(model), reference(Net, 1, C, 3, data) / 2) < 1e-5   # sum / (expected 3 x 2 iterations)
    assert engine.accountant.history == [(0.0, 1.0, 1)]                  # rate 2 x 1/2


def test_compatibility_surface():
    engine = PrivacyEngine()
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert not engine.is_compatible(module=bn, optimizer=None, data_loader=None)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        engine.validate(module=bn, optimizer=None, data_loader=None)
    with pytest.raises(UnsupportedModuleError):
        PrivateModule(bn)
    fixed = PrivacyEngine.get_compatible_module(bn)
    assert engine.is_compatible(module=fixed, optimizer=None, data_loader=None)


def test_save_and_load_checkpoint_roundtrip(tmp_path):
    model = fresh(Net)
    engine, pm, opt, loader = loader_engine(model, sigma=1.0)
    for x, t in loader:
        row_losses(pm, x, t).mean().backward()
        opt.step()
        opt.zero_grad()
    engine.save_checkpoint(path=tmp_path / "ck.pt", module=pm, optimizer=opt, checkpoint_dict={"epoch": 3})
    model2 = fresh(Net, seed=1)
    engine2, pm2, opt2, _ = loader_engine(model2, sigma=1.0)
    ck = engine2.load_checkpoint(path=tmp_path / "ck.pt", module=pm2, optimizer=opt2)
    assert ck["epoch"] == 3 and engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_wrap_model_false_returns_the_model_itself():
    K, C, data = 2, 0.05, rows(3, 2)
    model = fresh(Net)
    engine = PrivacyEngine()
    with pytest.warns(UserWarning):
        same, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                                data_loader=DataLoader(grouped(data, K), batch_size=3),
                                                noise_multiplier=0.0, max_grad_norm=C, noise_multiplicity=K,
                                                wrap_model=False, poisson_sampling=False)
    assert same is model
    for x, t in loader:
        row_losses(model, x.flatten(0, 1), t.flatten()).mean().backward()
    opt.step()
    assert rel(flat(model), reference(Net, K, C, 3, data)) < 1e-5


def test_module_registered_under_two_names_but_used_once_is_not_tied():
    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.alias = self.lin        # as Opacus's DPRNN does

        def forward(self, x):
            return self.lin(x).squeeze(-1)
    x, t = torch.randn(4, 3), torch.randn(4)
    loss = lambda m, x, t: (m(x) - t) ** 2  # noqa: E731
    model = fresh(TwoNames)
    pm, opt = zero_noise_engine(model, 2, 0.1, 2)
    loss(pm, x, t).mean().backward()
    opt.step()
    assert rel(torch.cat([model.lin.weight.grad.reshape(-1), model.lin.bias.grad]),
               reference(TwoNames, 2, 0.1, 2, (x, t), loss)) < 1e-5


# -- found by adversarial review ------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["frozen_bn", "bn_no_affine", "instance_norm_running"])
def test_cross_example_layers_are_refused_even_without_trainable_parameters(layer):
    norm = {"frozen_bn": lambda: nn.BatchNorm1d(3).requires_grad_(False),
            "bn_no_affine": lambda: nn.BatchNorm1d(3, affine=False),
            "instance_norm_running": lambda: nn.InstanceNorm1d(3, track_running_stats=True)}[layer]()
    model = nn.Sequential(nn.Linear(3, 3), norm)
    assert not PrivacyEngine().is_compatible(module=model)
    with pytest.raises(UnsupportedModuleError, match="mixes examples"):
        PrivateModule(model)


def test_tensors_nested_in_arguments_are_refused():
    class Film(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x, scales):
            return x * self.w * scales[0]

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.film = Film()

        def forward(self, x):
            return self.film(x, (x[:, :1],)).sum(-1)
    with pytest.warns(UserWarning, match="torch.func"):
        pm, opt = zero_noise_engine(Outer(), 1, 1.0, 2)
    with pytest.raises(NotImplementedError, match=r"tensors inside \['tuple'\]"):
        pm(torch.randn(2, 3))


def test_layer_rows_must_be_the_models_rows():
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):                     # (N, T, D) -> (N*T, D): rows are no longer examples
            return self.lin(x.reshape(-1, 4)).reshape(x.shape[0], -1).sum(-1)

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(4, 3)

        def forward(self, x):                     # T == N here: only the row check catches it
            return (x + self.pos(torch.arange(x.shape[1]))[None]).sum(dim=(1, 2))
    pm, _ = zero_noise_engine(Flattening(), 1, 1.0, 2)
    with pytest.raises(ValueError, match="returned 6 rows, but the private module was called with 2"):
        pm(torch.randn(2, 3, 4))
    pm, _ = zero_noise_engine(Positions(), 1, 1.0, 2)
    with pytest.raises(ValueError, match="returned 4 rows, but the private module was called with 2"):
        pm(torch.randn(2, 4, 3))


def test_model_changed_after_wrapping_is_refused():
    model = fresh(Net)
    pm, opt = zero_noise_engine(model, 1, 1.0, 2)
    model.norm = nn.GroupNorm(1, 4)
    with pytest.raises(RuntimeError, match="modules changed after make_private"):
        pm(rows(2, 1)[0])


def test_layer_options_changed_after_wrapping_are_refused():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, idx):
            return self.emb(idx).sum(-1)
    model = Tokens()
    pm, opt = zero_noise_engine(model, 1, 1.0, 2)
    model.emb.max_norm = 1.0
    with pytest.raises(NotImplementedError, match="max_norm"):
        pm(torch.tensor([3, 7]))
    model.emb.max_norm = None
    model.emb.forward = lambda idx: F.embedding(idx, 2 * model.emb.weight)
    with pytest.raises(NotImplementedError, match="replaced on the instance"):
        pm(torch.tensor([3, 7]))


def test_buffers_updated_from_the_batch_are_refused():
    class RunningMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("mean", torch.zeros(2))

        def forward(self, x):
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
            return self.lin(x).sum(-1)
    pm, opt = zero_noise_engine(RunningMean(), 1, 1.0, 2)
    with pytest.raises(RuntimeError, match=r"buffers \['mean'\] were modified"):
        pm(torch.randn(2, 2))


def test_global_forward_hooks_are_refused():
    from torch.nn.modules.module import register_module_forward_hook
    pm, opt = zero_noise_engine(fresh(Net), 1, 1.0, 2)
    handle = register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(RuntimeError, match="global module forward hooks"):
            pm(rows(2, 1)[0])
    finally:
        handle.remove()


def test_secure_mode_refuses_a_non_secure_poisson_loader():
    from dpdm_fast.engine.sampling.poisson import make_poisson_loader
    prebuilt = make_poisson_loader(DataLoader(_indexed(20), batch_size=4))
    model = fresh(Net)
    with pytest.raises(ValueError, match="secure_mode"):
        PrivacyEngine(secure_mode=True).make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                     data_loader=prebuilt, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("sampler", ["duplicates", "other_source"])
def test_samplers_over_other_examples_are_refused(sampler):
    from torch.utils.data import SequentialSampler
    s = SubsetRandomSampler([0, 0, 0, 1]) if sampler == "duplicates" else SequentialSampler(range(2))
    model = fresh(Net)
    with pytest.raises(ValueError, match="repeats indices" if sampler == "duplicates" else "does not visit"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(_indexed(4), batch_size=2, sampler=s),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_without_poisson_each_example_is_still_clipped_once_per_batch():
    model = fresh(Net)
    engine = PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        pm, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                              data_loader=DataLoader(_indexed(6), batch_size=3),
                                              noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    x, t = next(iter(loader))
    row_losses(pm, x, t).mean().backward()
    row_losses(pm, x, t).mean().backward()     # the same batch twice is not two accumulated batches
    with pytest.raises(RuntimeError, match="clipped 6 examples but its batch has 3"):
        opt.step()
    assert engine.steps == 0


def test_rand_on_empty_is_refused():
    model = fresh(Net)
    with pytest.raises(NotImplementedError, match="rand_on_empty"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(_indexed(4), batch_size=2), noise_multiplier=1.0,
                                     max_grad_norm=1.0, rand_on_empty=True)


def test_a_dropped_engine_frees_its_per_example_buffer():
    """Parameter hooks are invisible to Python's cycle collector; they must not keep the engine alive."""
    import gc
    model = fresh(Net)
    pm, opt = zero_noise_engine(model, 1, 1.0, 2)
    row_losses(pm, *rows(2, 1)).mean().backward()
    opt.step()
    collector = weakref.ref(pm.collector)
    del pm, opt, model
    gc.collect()
    assert collector() is None


def test_a_failed_final_pass_discards_the_step_and_a_failed_fold_keeps_the_examples():
    """The clip-weighted sum is folded in at the end of each backward; if that pass fails, no
    example's contribution is silently lost: a failed fold keeps its job (folded at the next backward or
    the step), a failed step discards all."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    pm, opt = zero_noise_engine(model, 1, 1e3, 1, "sum")
    x = torch.randn(2, 4)
    backend = pm.collector.backend
    real = backend.reduce

    def failing(*a, **k):
        raise RuntimeError("injected kernel failure")
    pm(x[:1]).sum().backward()
    backend.reduce = failing
    with pytest.raises(RuntimeError, match="injected"):
        pm(x[1:]).sum().backward()        # folding example 1 in fails at the end of its backward
    backend.reduce = real
    opt.step()                            # its job was kept: folded in now
    torch.manual_seed(0)
    ref = nn.Linear(4, 3)
    ref(x).sum().backward()
    assert torch.allclose(model.weight.grad, ref.weight.grad, atol=1e-6)   # both examples, each once
    opt.zero_grad()
    pm(x).sum().backward()
    backend.reduce = failing
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    backend.reduce = real
    assert pm.collector.num_examples == 0 and not pm.collector.holds_examples   # discarded, not half-applied


def test_an_unattached_grad_scaler_is_refused_with_a_reason_and_nothing_is_released():
    """A GradScaler the engine does not know of leaves the loss scale in the per-example gradients (they would
    be clipped at C / scale): its step is refused (tests/test_engine_fp16.py covers the attached one)."""
    from dpdm_fast.engine import PrivacyEngine
    torch.manual_seed(0)
    engine, net = PrivacyEngine(), nn.Linear(4, 3)
    model, opt, loader = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 3)), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(loader))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    with pytest.raises(RuntimeError, match="attach_grad_scaler"):
        scaler.step(opt)
    assert engine.steps == 0
    opt.zero_grad()
    off = torch.amp.GradScaler("cpu", enabled=False)       # a disabled scaler is plain fp32 training
    off.scale(((model(x) - y) ** 2).mean()).backward()
    off.step(opt)
    assert engine.steps == 1
