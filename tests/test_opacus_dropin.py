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


def test_two_forwards_in_one_backward_are_refused():
    """Row b of both forwards would be one group: two examples clipped together (sensitivity 2C)."""
    pm, _ = zero_noise_engine(fresh(TiedLM), 1, 1.0, 1)
    x = torch.randint(0, 13, (2, 5))
    with pytest.raises(RuntimeError, match="two forward passes"):
        (pm(x).sum() + pm(x).sum()).backward()


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
