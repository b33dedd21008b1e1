"""Every per-layer rule against a plain per-group autograd loop."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dpdm_fast.engine.capture.rules import find_rule, functorch_rule
from dpdm_fast.models import NIN

SETTINGS = settings(max_examples=12, deadline=None)


def loop_reference(module, x, g, K):
    """Per-group gradient by brute force: autograd of sum_r <module(x_r), g_r> per group."""
    params = dict((n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad)
    B = x.shape[0] // K
    out = {n: [] for n in params}
    for b in range(B):
        y = module(x[b * K:(b + 1) * K])
        grads = torch.autograd.grad((y * g[b * K:(b + 1) * K]).sum(), list(params.values()), allow_unused=True)
        for n, gr in zip(params, grads):
            out[n].append(torch.zeros_like(params[n]) if gr is None else gr)
    return {n: torch.stack(v) if v else torch.zeros(0, *params[n].shape) for n, v in out.items()}


def check(module, x, K, rule=None, rtol=1e-4, atol=1e-5):
    with torch.no_grad():
        y = module(x)
    g = torch.randn_like(y)
    rule = rule or find_rule(module).rule
    ours = rule(module, (x,), g, K)
    ref = loop_reference(module, x, g, K)
    assert set(ours) == set(ref)
    for n in ref:
        assert ours[n].shape == ref[n].shape, n
        torch.testing.assert_close(ours[n], ref[n], rtol=rtol, atol=atol)


@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 4),
       groups=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dil=st.integers(1, 2), size=st.integers(5, 8), bias=st.booleans())
def test_conv2d_rule(B, K, cin, cout, groups, k, stride, pad, dil, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin * groups, cout * groups, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    check(conv, torch.randn(B * K, cin * groups, size, size + 1), K)


def test_conv2d_same_padding():
    torch.manual_seed(0)
    check(nn.Conv2d(3, 4, 3, padding="same", dilation=2), torch.randn(6, 3, 7, 7), 3)


@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), T=st.sampled_from([None, 1, 4]), din=st.integers(1, 6),
       dout=st.integers(1, 6), bias=st.booleans())
def test_linear_rule(B, K, T, din, dout, bias):
    torch.manual_seed(0)
    shape = (B * K, din) if T is None else (B * K, T, 2, din)
    check(nn.Linear(din, dout, bias=bias), torch.randn(*shape), K)


@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), per=st.integers(1, 3),
       size=st.integers(2, 5))
def test_group_norm_rule(B, K, G, per, size):
    torch.manual_seed(0)
    gn = nn.GroupNorm(G, G * per, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    check(gn, torch.randn(B * K, G * per, size, size), K)


@pytest.mark.parametrize("B,K,G,per", [(3, 2, 2, 3), (2, 1, 4, 1), (1, 3, 1, 5)])
def test_group_norm_rule_with_the_forwards_statistics(B, K, G, per):
    """In the engine the rule reuses the mean and 1/std autograd saved in the forward."""
    from dpdm_fast.engine.capture.rules.norm import _group_norm_stats
    torch.manual_seed(0)
    gn = nn.GroupNorm(G, G * per, eps=1e-5)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(B * K, G * per, 4, 3, requires_grad=True)
    for p in gn.parameters():
        p.requires_grad_(False)   # as the engine runs a layer's forward
    y = gn(x)
    saved = _group_norm_stats(gn, (x,), y)
    assert saved is not None and saved[0].shape == (B * K, G)
    for p in gn.parameters():
        p.requires_grad_(True)
    g = torch.randn_like(y)
    ours = find_rule(gn).rule(gn, (x.detach(),), g, K, saved=saved)
    ref = loop_reference(gn, x.detach(), g, K)
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-5)
    for p in gn.parameters():
        p.requires_grad_(False)
    assert _group_norm_stats(gn, (x,), gn(x.detach())) is None  # no graph: the rule recomputes them


def test_group_norm_first_and_later_in_a_model_matches_the_loop():
    """A GroupNorm on the raw input (no autograd statistics to reuse) and one after a conv."""
    from dpdm_fast.engine.reference import per_example_loop_update
    from engine_helpers import flat_grad, rel, zero_noise_engine
    torch.manual_seed(0)
    net = nn.Sequential(nn.GroupNorm(1, 2), nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Flatten(),
                        nn.Linear(4 * 25, 1))
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.weight.normal_()
            m.bias.normal_()
    K, B, C = 2, 3, 0.3
    x, t = torch.randn(B * K, 2, 5, 5), torch.randn(B * K, 1)
    loss_rows = lambda m, x, t: ((m(x) - t) ** 2).squeeze(-1)  # noqa: E731
    ref = per_example_loop_update(net, loss_rows, (x, t), K, C, B)
    pm, opt = zero_noise_engine(net, K, C, B)
    loss_rows(pm, x, t).mean().backward()
    opt.step()
    assert rel(flat_grad(net), ref) < 1e-5


@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), T=st.integers(1, 4), d=st.integers(2, 5))
def test_layer_norm_rule(B, K, T, d):
    torch.manual_seed(0)
    check(nn.LayerNorm(d), torch.randn(B * K, T, d), K)


@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), T=st.sampled_from([None, 3]), V=st.integers(2, 6),
       pad=st.sampled_from([None, 0]))
def test_embedding_rule(B, K, T, V, pad):
    torch.manual_seed(0)
    emb = nn.Embedding(V, 3, padding_idx=pad)
    idx = torch.randint(0, V, (B * K,) if T is None else (B * K, T))
    check(emb, idx, K)


@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), c=st.integers(1, 4), o=st.integers(1, 4), size=st.integers(1, 4))
def test_nin_rule(B, K, c, o, size):
    torch.manual_seed(0)
    nin = NIN(c, o, init_scale=1.0)
    with torch.no_grad():
        nin.b.normal_()
    check(nin, torch.randn(B * K, c, size, size), K)


class Scale(nn.Module):
    """A custom layer without a rule: exercised through the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.s)


@pytest.mark.parametrize("B,K", [(3, 2), (2, 1), (0, 2)])
def test_functorch_fallback(B, K):
    torch.manual_seed(0)
    mod = Scale(4)
    check(mod, torch.randn(B * K, 5, 4), K, rule=functorch_rule)


def test_rows_not_multiple_of_K():
    with pytest.raises(ValueError, match="not a multiple of the noise multiplicity K=3"):
        find_rule(nn.Linear(2, 2)).rule(nn.Linear(2, 2), (torch.randn(4, 2),), torch.randn(4, 2), 3)


@pytest.mark.parametrize("path", ["grouped", "loop", "unfold", "rows"])
@SETTINGS
@given(B=st.integers(0, 3), K=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 4),
       k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2), dil=st.integers(1, 2),
       size=st.integers(5, 17), groups=st.sampled_from([1, 2]))
def test_every_conv2d_path_matches_the_loop(path, B, K, cin, cout, k, stride, pad, dil, size, groups):
    from dpdm_fast.engine.capture.autotune import force_path
    if path == "unfold":
        groups = 1  # the unfold path is only a candidate for ungrouped convolutions
    if path == "rows":
        K = max(K, 2)  # the rows path is only a candidate for K > 1
    torch.manual_seed(0)
    module = nn.Conv2d(cin * groups, cout * groups, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    with force_path("conv2d", path):
        check(module, torch.randn(B * K, cin * groups, size, size + 2), K)


def test_autotuner_keeps_the_fastest_path_per_shape_bucket(monkeypatch):
    from dpdm_fast.engine import autotune
    autotune.clear_cache()
    calls = []
    slow = lambda name, cost: lambda: calls.append(name) or __import__("time").sleep(cost) or name  # noqa: E731
    candidates = {"a": slow("a", 0.1), "b": slow("b", 0.005), "c": slow("c", 0.01)}
    dev = torch.device("cpu")
    assert autotune.run_fastest("r", ("k", autotune.batch_bucket(5)), candidates, dev) == "b"
    # a warm-up each, then two timed runs each, except for a: 20x slower than b at warm-up, pruned
    assert sorted(calls) == ["a"] + ["b"] * 3 + ["c"] * 3
    calls.clear()
    assert autotune.run_fastest("r", ("k", autotune.batch_bucket(7)), candidates, dev) == "b"
    assert calls == ["b"]                                         # 5 and 7 share the bucket 8: cached
    assert autotune.chosen_paths()[("r", ("k", 8))] == "b"
    with autotune.force_path("r", "c"):
        assert autotune.run_fastest("r", ("k", 8), candidates, dev) == "c"
    autotune.clear_cache()


def test_autotuner_is_not_fooled_by_one_slow_timing():
    """A burst of machine noise during one timed run of the fastest path must not make it lose."""
    from dpdm_fast.engine import autotune
    autotune.clear_cache()
    import time
    b_calls = []

    def b():  # fastest, but its first timed run (its second call) hits a 50 ms stall
        b_calls.append(1)
        time.sleep(0.05 if len(b_calls) == 2 else 0.004)
        return "b"
    candidates = {"b": b, "c": lambda: time.sleep(0.01) or "c"}
    assert autotune.run_fastest("r2", ("k",), candidates, torch.device("cpu")) == "b"
    assert len(b_calls) == 3
    autotune.clear_cache()


def test_per_example_norms_match_a_float64_reference():
    """The clip factors come from these norms. An fp32 norm over a whole 1.75M-parameter row is off by
    up to ~1e-4 (torch's long-row reduction); the engine sums per-parameter squared norms instead."""
    from engine_helpers import dpdm_rows, mnist_net, rel, row_losses, zero_noise_engine
    K, B = 2, 2
    net = mnist_net()
    loss, rows = dpdm_rows(B, K)
    params = [p for p in net.parameters() if p.requires_grad]
    ref = []
    for b in range(B):
        chunk = [r[b * K:(b + 1) * K] for r in rows]
        grads = torch.autograd.grad(row_losses(loss, net, *chunk).mean(), params)
        ref.append(torch.cat([g.reshape(-1) for g in grads]).double().norm())
    pm, _ = zero_noise_engine(net, K)
    row_losses(loss, pm, *rows).mean().backward()
    assert rel(pm.collector.last_norms.double(), torch.stack(ref)) < 3e-6


def test_builtin_rules_write_straight_into_the_buffer(monkeypatch):
    """No copy pass: every built-in rule hands back the buffer's own block (the grouped conv path copies
    its result there itself, so that the autotune times that copy too)."""
    from dpdm_fast.engine import autotune
    from dpdm_fast.engine.clipping.buffer import same_memory as _same_memory
    from dpdm_fast.engine.clipping.collector import GroupGradientCollector
    from engine_helpers import dpdm_rows, mnist_net, row_losses, zero_noise_engine
    copied = []
    original = GroupGradientCollector.write

    def spy(self, param, per_group, name, **kw):
        if not _same_memory(per_group, self.target(param)):
            copied.append(name)
        return original(self, param, per_group, name, **kw)
    monkeypatch.setattr(GroupGradientCollector, "write", spy)
    net = mnist_net()
    loss, rows = dpdm_rows(2, 2)
    pm, _ = zero_noise_engine(net, 2)
    with autotune.force_path("conv2d", "loop"):
        row_losses(loss, pm, *rows).mean().backward()
    assert copied == []
    with autotune.force_path("conv2d", "grouped"):
        pm2, _ = zero_noise_engine(mnist_net(), 2)
        row_losses(loss, pm2, *rows).mean().backward()
    assert copied == []

    class Scaled(nn.Linear):   # a subclass: the torch.func fallback, which returns fresh tensors
        def forward(self, x):
            return super().forward(2 * x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm3, _ = zero_noise_engine(nn.Sequential(Scaled(3, 2)), 1)
    pm3(torch.randn(2, 3)).sum().backward()
    assert sorted(copied) == ["0.bias", "0.weight"]  # the spy does see copies


@pytest.mark.parametrize("options", [dict(padding="same", kernel_size=4), dict(padding="same", kernel_size=(2, 3)),
                                     dict(padding=1, padding_mode="reflect", kernel_size=3),
                                     dict(padding=(1, 2), padding_mode="circular", kernel_size=3),
                                     dict(padding="same", padding_mode="replicate", kernel_size=2)])
def test_conv2d_asymmetric_same_and_other_padding_modes(options):
    """The input is padded as Conv2d._conv_forward pads it (the extra of an even 'same' on the right)."""
    torch.manual_seed(0)
    check(nn.Conv2d(3, 4, **options), torch.randn(6, 3, 7, 8), 3)
