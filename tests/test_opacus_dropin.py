"""Issue 22: Opacus programs that use parameters more than once, sequence-first batches, Opacus's DP layers.

Each exact claim is checked against the per-example autograd loop (``per_example_loop_update``) and, where
Opacus supports the pattern (K = 1), against Opacus's own per-row gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.layers import DPGRU, DPLSTM, DPRNN

from dpdm_fast.engine.reference import opacus_k_averaged_update, per_example_loop_update
from engine_helpers import flat_grad, rel, zero_noise_engine


class TiedLM(nn.Module):
    """Tied embedding / output layer, and a layer run twice per forward."""

    def __init__(self, V=13, D=6):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.fc(self.emb(x)))
        return self.out(torch.tanh(self.fc(h))).mean(1)


class Recurrent(nn.Module):
    def __init__(self, cell, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb, self.rnn, self.head = nn.Embedding(11, 4), cell(4, 5, batch_first=batch_first), nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def ce_rows(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def fresh(cls, *args, seed=0):
    torch.manual_seed(seed)
    return cls(*args)


def engine_update(model, rows, K, C, expected, loss=ce_rows, **kw):
    pm, opt = zero_noise_engine(model, K, C, expected, **kw)
    loss(pm, *rows).mean().backward()
    opt.step()
    update = flat_grad(model)
    pm.remove_hooks()
    return update


@pytest.mark.parametrize("K", [1, 3])
def test_tied_weights_and_a_layer_called_twice_match_the_loop(K):
    torch.manual_seed(1)
    x, y = torch.randint(0, 13, (4 * K, 5)), torch.randint(0, 13, (4 * K,))
    for C in (1e-3, 100.0):   # every example clipped / none clipped
        ours = engine_update(fresh(TiedLM), (x, y), K, C, 4)
        loop = per_example_loop_update(fresh(TiedLM), ce_rows, (x, y), K, C, 4)
        assert rel(ours, loop) < 1e-5
        if K == 1:
            assert rel(ours, opacus_k_averaged_update(fresh(TiedLM), ce_rows, (x, y), 1, C, 4)) < 1e-5


def test_the_norm_is_taken_over_the_sum_of_the_uses():
    """Clipping each use separately (or the norm of one use) would give other per-example norms."""
    torch.manual_seed(2)
    x = torch.randint(0, 13, (3, 5))
    model = fresh(TiedLM)
    pm, _ = zero_noise_engine(model, 1, 1.0, 1, reduction="sum")
    pm(x).pow(2).sum().backward()
    ref = []
    plain = fresh(TiedLM)
    for b in range(3):
        grads = torch.autograd.grad(plain(x[b:b + 1]).pow(2).sum(), list(plain.parameters()))
        ref.append(torch.cat([g.reshape(-1) for g in grads]).norm())
    torch.testing.assert_close(pm.collector.last_norms, torch.stack(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", [DPLSTM, DPGRU, DPRNN])
@pytest.mark.parametrize("K", [1, 2])
def test_opacus_dp_rnn_layers_match_the_loop(cell, K):
    torch.manual_seed(3)
    x, y = torch.randint(0, 11, (3 * K, 4)), torch.randint(0, 3, (3 * K,))
    ours = engine_update(fresh(Recurrent, cell), (x, y), K, 0.05, 3)
    assert rel(ours, per_example_loop_update(fresh(Recurrent, cell), ce_rows, (x, y), K, 0.05, 3)) < 1e-5
    if K == 1:
        assert rel(ours, opacus_k_averaged_update(fresh(Recurrent, cell), ce_rows, (x, y), 1, 0.05, 3)) < 1e-5


def test_one_backward_through_two_forwards_sums_row_b_of_each_as_opacus():
    """DCGAN's discriminator loss (real batch + generated batch, one backward): example b's gradient is the
    sum of row b's in both forwards, clipped once, as Opacus's per-sample gradients are."""
    torch.manual_seed(6)
    real, fake, y = torch.randint(0, 13, (3, 5)), torch.randint(0, 13, (3, 5)), torch.randint(0, 13, (3,))

    def both(model, real, fake, y):
        return F.cross_entropy(model(real), y, reduction="none") + F.cross_entropy(model(fake), y, reduction="none")
    ours = engine_update(fresh(TiedLM), (real, fake, y), 1, 0.05, 3, loss=both)
    assert rel(ours, per_example_loop_update(fresh(TiedLM), both, (real, fake, y), 1, 0.05, 3)) < 1e-5
    assert rel(ours, opacus_k_averaged_update(fresh(TiedLM), both, (real, fake, y), 1, 0.05, 3)) < 1e-5


def test_a_batch_split_over_two_forwards_of_one_backward_is_refused_at_the_step():
    """Row b of each half would be one group (two private examples clipped together): the step's check of the
    clipped examples against the loader's batch catches it."""
    from torch.utils.data import DataLoader, TensorDataset
    from dpdm_fast import PrivacyEngine
    model = fresh(TiedLM)
    data = TensorDataset(torch.randint(0, 13, (8, 5)), torch.randint(0, 13, (8,)))
    with pytest.warns(UserWarning):
        pm, opt, loader = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                       data_loader=DataLoader(data, batch_size=8),
                                                       noise_multiplier=1.0, max_grad_norm=1.0,
                                                       poisson_sampling=False)
    x, y = next(iter(loader))
    (F.cross_entropy(pm(x[:4]), y[:4]) + F.cross_entropy(pm(x[4:]), y[4:])).backward()
    with pytest.raises(RuntimeError, match="batch"):
        opt.step()


def test_a_tied_weight_used_directly_by_its_outer_owner_is_refused():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))
            self.inner = nn.Linear(3, 3, bias=False)
            self.inner.weight = self.weight

        def forward(self, x):
            return self.inner(x @ self.weight)
    pm, _ = zero_noise_engine(Nested(), 1, 1.0, 1)
    with pytest.raises(RuntimeError, match="ordinary"):   # the outer use is not a layer's: refused at backward
        pm(torch.randn(2, 3)).sum().backward()


def test_a_module_calling_itself_is_refused():
    class Recursive(nn.Linear):
        def forward(self, x, depth=1):
            return super().forward(x) if depth == 0 else self(super().forward(x), depth - 1)
    with pytest.warns(UserWarning, match="fallback"):
        pm, _ = zero_noise_engine(Recursive(3, 3), 1, 1.0, 1)
    with pytest.raises(NotImplementedError, match="same parameters"):
        pm(torch.randn(2, 3))


class SeqFirstAttention(nn.Module):
    """Opacus's text test model: (T, B) tokens, attention, per-position outputs; batch on dim 1."""

    def __init__(self):
        super().__init__()
        from opacus.layers import DPMultiheadAttention
        self.emb, self.attn, self.fc = nn.Embedding(17, 8), DPMultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        h, _ = self.attn(h, h, h)
        return self.fc(h).mean(0)          # (B, 3)


def seq_first_ce(model, x, y):
    """Rows (examples) on dim 0 for the loop; the model takes them sequence-first."""
    return F.cross_entropy(model(x.t()), y, reduction="none")


@pytest.mark.parametrize("K", [1, 2])
def test_batch_first_false_matches_the_loop_and_opacus(K):
    from opacus import GradSampleModule
    from dpdm_fast.engine import DPOptimizer, PrivateModule
    torch.manual_seed(4)
    x, y = torch.randint(0, 17, (3 * K, 5)), torch.randint(0, 3, (3 * K,))
    model = fresh(SeqFirstAttention)
    pm = PrivateModule(model, noise_multiplicity=K, max_grad_norm=0.1, batch_first=False)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm.collector, noise_multiplier=0.0,
                      expected_batch_size=3)
    seq_first_ce(pm, x, y).mean().backward()
    opt.step()
    ours = flat_grad(model)
    assert rel(ours, per_example_loop_update(fresh(SeqFirstAttention), seq_first_ce, (x, y), K, 0.1, 3)) < 1e-5
    if K == 1:
        plain = fresh(SeqFirstAttention)
        gsm = GradSampleModule(plain, batch_first=False, loss_reduction="mean")
        seq_first_ce(gsm, x, y).mean().backward()
        per = torch.cat([p.grad_sample.reshape(3, -1) for p in plain.parameters()], 1)
        factors = (0.1 / (per.norm(dim=1) + 1e-6)).clamp(max=1)
        assert rel(ours, factors @ per / 3) < 1e-5


# -- p.grad_sample / p.summed_grad ------------------------------------------------------------------

def small_engine(clipping="flat", C=1.0, n=6, batch=3, reduction="mean", **kw):
    from torch.utils.data import DataLoader, TensorDataset
    from dpdm_fast import PrivacyEngine
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)))
    with pytest.warns(UserWarning):
        engine = PrivacyEngine()
        out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                  data_loader=DataLoader(data, batch_size=batch), noise_multiplier=0.0,
                                  max_grad_norm=C, clipping=clipping, poisson_sampling=False,
                                  loss_reduction=reduction, **kw)
    return (model, *out)


def per_example_grads(model, x, y, reduction="mean"):
    """Opacus's grad_sample: each example's gradient of its own loss (for 'mean', the batch loss times n)."""
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))   # the wrapped model refuses direct calls
    plain.load_state_dict(model.state_dict())
    model = plain
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        rows.append([t.detach() for t in g])
    return [torch.stack(r) for r in zip(*rows)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_sample_and_summed_grad_are_views_with_opacus_values(reduction):
    model, pm, opt, loader = small_engine(C=0.3, reduction=reduction)
    x, y = next(iter(loader))
    F.cross_entropy(pm(x), y, reduction=reduction).backward()
    ref = per_example_grads(model, x, y)
    buffer = pm.collector._buffer.storage
    norms = torch.cat([g.reshape(len(x), -1) for g in ref], 1).norm(dim=1)
    factors = (0.3 / (norms + 1e-6)).clamp(max=1)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad_sample, g, rtol=1e-5, atol=1e-6)
        assert p.grad_sample.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()   # no copy
        torch.testing.assert_close(p.summed_grad, torch.einsum("b,b...->...", factors, g), rtol=1e-5, atol=1e-6)
    summed = [p.summed_grad.clone() for p in model.parameters()]
    opt.step()
    for p, s in zip(model.parameters(), summed):   # still readable after the step (Opacus's tests read it)
        torch.testing.assert_close(p.summed_grad, s)
    opt.zero_grad()
    assert all(p.grad_sample is None and p.summed_grad is None for p in model.parameters())


@pytest.mark.parametrize("write", ["in_place", "replaced"])
def test_writing_grad_sample_is_refused_at_the_step(write):
    model, pm, opt, loader = small_engine()
    x, y = next(iter(loader))
    F.cross_entropy(pm(x), y).backward()
    p = model[0].weight
    if write == "in_place":
        p.grad_sample.zero_()
    else:
        p.grad_sample = torch.zeros_like(p.grad_sample)
    with pytest.raises(RuntimeError, match="grad_sample was modified"):
        opt.step()


def test_writing_summed_grad_changes_the_step_as_in_opacus():
    model, pm, opt, loader = small_engine()
    x, y = next(iter(loader))
    F.cross_entropy(pm(x), y).backward()
    model[0].weight.summed_grad.zero_()
    model[0].bias.summed_grad.fill_(3.0)
    opt.step()
    assert model[0].weight.grad.abs().max() == 0
    torch.testing.assert_close(model[0].bias.grad, torch.full((5,), 3.0 / 3))


# -- per-layer and adaptive clipping -----------------------------------------------------------------

def test_per_layer_clipping_matches_a_loop_and_opacus():
    from opacus.optimizers import DPPerLayerOptimizer
    bounds = [0.05, 0.5, 0.01, 1.0]
    model, pm, opt, loader = small_engine("per_layer", C=bounds)
    x, y = next(iter(loader))
    ref = per_example_grads(model, x, y)
    F.cross_entropy(pm(x), y).backward()
    opt.step()
    for p, g, c in zip(model.parameters(), ref, bounds):   # the loop: each parameter clipped to its bound
        f = (c / (g.reshape(len(x), -1).norm(dim=1) + 1e-6)).clamp(max=1)
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", f, g) / 3, rtol=1e-5, atol=1e-7)
    assert opt.max_grad_norm == pytest.approx(float(torch.tensor(bounds).norm()))   # the noise's scale
    # Opacus's optimizer on the same per-example gradients
    ours = [p.grad.clone() for p in model.parameters()]
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    theirs = DPPerLayerOptimizer(torch.optim.SGD(plain.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=bounds, expected_batch_size=3)
    for q, g in zip(plain.parameters(), ref):
        q.grad_sample = g
    theirs.pre_step()
    for a, q in zip(ours, plain.parameters()):
        torch.testing.assert_close(a, q.grad, rtol=1e-5, atol=1e-7)
    assert theirs.max_grad_norm == pytest.approx(opt.max_grad_norm)


def test_per_layer_bounds_follow_the_optimizers_parameter_order():
    from torch.utils.data import DataLoader, TensorDataset
    from dpdm_fast import PrivacyEngine
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params[::-1], lr=0.0)   # reversed
    with pytest.warns(UserWarning):
        pm, opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2),
            noise_multiplier=1.0, max_grad_norm=[1.0, 2.0, 3.0, 4.0], clipping="per_layer")
    assert pm.collector.max_grad_norms == [4.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="list"):
        pm.collector.max_grad_norm = 1.0


def adaclip_args(**kw):
    return {"target_unclipped_quantile": 0.5, "clipbound_learning_rate": 0.2, "max_clipbound": 10.0,
            "min_clipbound": 0.01, "unclipped_num_std": 1e-9, **kw}


def test_adaptive_clipping_matches_opacus_when_the_batch_has_its_expected_size():
    """Noise-free, with the realised batch equal to the expected one (where Opacus's fraction and the centred
    one coincide): the same clipped sum and the same next bound as Opacus's AdaClipDPOptimizer."""
    from opacus.optimizers import AdaClipDPOptimizer as Theirs
    model, pm, opt, loader = small_engine("adaptive", C=0.2, **adaclip_args())
    x, y = next(iter(loader))
    ref = per_example_grads(model, x, y)
    F.cross_entropy(pm(x), y).backward()
    opt.step()
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    theirs = Theirs(torch.optim.SGD(plain.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.2,
                    expected_batch_size=3, **adaclip_args(unclipped_num_std=0.0 + 1e-9))
    for q, g in zip(plain.parameters(), ref):
        q.grad_sample = g
    theirs.pre_step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert opt.max_grad_norm == pytest.approx(float(theirs.max_grad_norm), rel=1e-6)
    assert opt.max_grad_norm != 0.2


def test_adaptive_clipping_releases_a_centred_count_and_accounts_with_the_given_sigma():
    model, pm, opt, loader = small_engine("adaptive", C=0.2, **adaclip_args(unclipped_num_std=2.0))
    assert opt._gradient_noise_multiplier() == 0.0
    opt.noise_multiplier = 1.0
    assert opt._gradient_noise_multiplier() == pytest.approx((1 - 1 / 16) ** -0.5)   # (s^-2 - (2 s_b)^-2)^-1/2
    opt.noise_multiplier = 4.0   # (a scheduler's change) no budget left for the gradient
    with pytest.raises(ValueError, match="2 \\* unclipped_num_std"):
        opt._gradient_noise_multiplier()
    opt.noise_multiplier = 1.0
    torch.manual_seed(0)
    counts = []
    for _ in range(200):   # the released count is centred: sum(1[unclipped] - 1/2) + N(0, s_b^2)
        x, y = next(iter(loader))
        F.cross_entropy(pm(x), y).backward()
        unclipped = (pm.collector.last_norms <= opt.max_grad_norm).sum().item()
        opt.step()
        opt.zero_grad()
        counts.append(opt.unclipped_num - (unclipped - 1.5))
    noise = torch.tensor(counts)
    assert abs(noise.mean()) < 0.5 and 1.6 < noise.std() < 2.4


def test_ghost_mode_returns_opacus_four_values_and_the_same_update():
    model, pm, opt, criterion, loader = small_engine(C=0.3, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss())
    x, y = next(iter(loader))
    loss = criterion(pm(x), y)
    assert loss.item() == pytest.approx(F.cross_entropy(pm(x), y).item())
    (loss * 1.0).backward()
    opt.step()
    ghost = flat_grad(model)
    model2, pm2, opt2, loader2 = small_engine(C=0.3)
    next(iter(loader2))
    F.cross_entropy(pm2(x), y).backward()
    opt2.step()
    assert rel(ghost, flat_grad(model2)) < 1e-6
    with pytest.raises(ValueError, match="criterion"):
        small_engine(grad_sample_mode="ghost")


def test_without_the_views_the_update_is_the_same_and_no_attribute_is_set():
    updates = []
    for views in (True, False):
        model, pm, opt, loader = small_engine(C=0.3, grad_sample_views=views)
        x, y = next(iter(loader))
        F.cross_entropy(pm(x), y).backward()
        assert (getattr(model[0].weight, "grad_sample", None) is not None) == views
        opt.step()
        updates.append(flat_grad(model))
    assert rel(updates[1], updates[0]) < 1e-6


# -- found by review -------------------------------------------------------------------------------

class BatchFirstInside(nn.Module):
    """Declared sequence-first, but its layer runs batch-first: with T == B its time steps look like examples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):                  # x: (T, B, 4)
        return self.fc(x.transpose(0, 1)).sum(1)


def test_batch_first_false_refuses_a_layout_it_cannot_tell_apart():
    from dpdm_fast.engine import PrivateModule
    pm = PrivateModule(BatchFirstInside(), max_grad_norm=0.1, batch_first=False)
    with pytest.raises(ValueError, match="both dim 0 and dim 1"):
        pm(torch.randn(3, 3, 4))          # T == B on the first call: ambiguous
    with pytest.raises(ValueError, match="rows"):
        pm(torch.randn(5, 3, 4))          # T != B: the layer's rows are on dim 0, refused
    # a sequence-first layer confirmed by a first unambiguous call is then trusted when T == B
    pm2 = PrivateModule(fresh(SeqFirstAttention), max_grad_norm=0.1, batch_first=False)
    pm2(torch.randint(0, 17, (5, 3))).sum().backward()
    pm2(torch.randint(0, 17, (3, 3))).sum().backward()


def test_batch_first_false_refuses_the_torch_func_fallback():
    from dpdm_fast.engine import PrivateModule

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(6, 1, 2))

        def forward(self, x):              # (T, B, 2): the fallback would split it on dim 0
            return (x + self.pos[:x.shape[0]]).sum(0)
    with pytest.warns(UserWarning), pytest.raises(NotImplementedError, match="sequence-first"):
        PrivateModule(Positional(), batch_first=False)


def test_an_empty_batch_with_a_parameter_used_twice():
    pm, opt = zero_noise_engine(fresh(TiedLM), 1, 1.0, 1)
    pm(torch.zeros(0, 5, dtype=torch.long)).sum().backward()
    assert pm.collector.num_examples == 0


def test_per_layer_bounds_set_again_unchanged_in_the_middle_of_a_step():
    bounds = [0.1, 0.2, 0.3, 0.7]
    model, pm, opt, loader = small_engine("per_layer", C=bounds)
    x, y = next(iter(loader))
    F.cross_entropy(pm(x), y).backward()
    opt.max_grad_norm = list(bounds)      # the same bounds: no change, no refusal
    with pytest.raises(RuntimeError, match="changed while"):
        opt.max_grad_norm = [0.1, 0.2, 0.3, 0.8]


def test_later_uses_of_a_linear_accumulate_inside_the_gemm(monkeypatch):
    """DPLSTM's per-time-step Linear: uses after the first add into the buffer block (baddbmm), no temporary;
    the update still matches the loop (covered above) and no later use goes through the copying path."""
    from dpdm_fast.engine.clipping.collector import GroupGradientCollector
    calls = []
    original = GroupGradientCollector.write

    def spy(self, param, per_group, name, accumulated=False):
        calls.append((name, accumulated))
        return original(self, param, per_group, name, accumulated=accumulated)
    monkeypatch.setattr(GroupGradientCollector, "write", spy)
    torch.manual_seed(3)
    x, y = torch.randint(0, 11, (3, 4)), torch.randint(0, 3, (3,))
    ours = engine_update(fresh(Recurrent, DPLSTM), (x, y), 1, 0.05, 3)
    assert rel(ours, per_example_loop_update(fresh(Recurrent, DPLSTM), ce_rows, (x, y), 1, 0.05, 3)) < 1e-5
    per_step = [a for n, a in calls if ".ih." in n]
    assert len(per_step) == 2 * 4 and per_step.count(False) == 2   # weight and bias: first of 4 steps only


def test_batch_first_false_with_a_single_example_is_not_ambiguous():
    """One example: its rows are all of them whichever dim holds the batch, so T == B == 1 is fine."""
    from dpdm_fast.engine import PrivateModule
    pm = PrivateModule(nn.Linear(4, 2), max_grad_norm=0.1, batch_first=False)
    pm(torch.randn(1, 1, 4)).sum().backward()
    assert pm.collector.num_examples == 1


def test_packed_sequences_are_refused_with_the_reason():
    from torch.nn.utils.rnn import pack_sequence
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = DPLSTM(4, 5)

        def forward(self, packed):
            return self.rnn(packed)[0].data.sum(1)
    pm, _ = zero_noise_engine(Packed(), 1, 1.0, 1)
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        pm(pack_sequence([torch.randn(3, 4), torch.randn(2, 4)]))


def test_checkpoints_carry_no_per_example_views():
    """p.grad_sample / p.summed_grad are private (raw, un-noised): an Opacus-format checkpoint taken right after a
    step holds plain tensors without them."""
    import io
    from dpdm_fast import PrivacyEngine
    model, pm, opt, loader = small_engine()
    x, y = next(iter(loader))
    F.cross_entropy(pm(x), y).backward()
    opt.step()
    assert model[0].weight.summed_grad is not None          # still readable in memory, as in Opacus
    buf = io.BytesIO()
    with pytest.warns(UserWarning):
        PrivacyEngine().save_checkpoint(path=buf, module=pm, optimizer=opt)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)["module_state_dict"]
    assert all(not getattr(t, "__dict__", {}) for t in saved.values())
