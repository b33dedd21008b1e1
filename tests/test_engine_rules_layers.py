"""The rules of RMSNorm, InstanceNorm1d/2d/3d, Conv1d/3d, ConvTranspose2d, EmbeddingBag and Opacus's
SequenceBias, each against a plain per-group autograd loop and (K=1) Opacus's grad samplers; then a few
models through the engine against the per-example loop."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.layers.dp_multihead_attention import DPMultiheadAttention, SequenceBias

from dpdm_fast.engine.capture.autotune import force_path
from dpdm_fast.engine.capture.rules import find_rule


def rows_of(args, b, K):
    """Group b's arguments: the tensors' rows b*K .. b*K+K-1 (non-tensors as they are)."""
    return tuple(a[b * K:(b + 1) * K] if isinstance(a, torch.Tensor) else a for a in args)


def loop_reference(module, args, g, K, split=rows_of):
    """Per-group gradient by brute force: autograd of sum_r <module(rows_r), g_r> over each group's rows."""
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    B = g.shape[0] // K
    out = {n: [] for n in params}
    for b in range(B if params else 0):
        y = module(*split(args, b, K))
        grads = torch.autograd.grad((y * g[b * K:(b + 1) * K]).sum(), list(params.values()), allow_unused=True)
        for n, gr in zip(params, grads):
            out[n].append(torch.zeros_like(params[n]) if gr is None else gr)
    return {n: torch.stack(v) if v else torch.zeros(0, *params[n].shape) for n, v in out.items()}


def opacus_reference(module, args, g):
    """Opacus's per-sample gradients (K=1) of sum_r <module(row_r), g_r> (loss_reduction='sum')."""
    plain = copy.deepcopy(module)
    gsm = GradSampleModule(plain, batch_first=True, loss_reduction="sum")
    try:
        (gsm(*args) * g).sum().backward()
        return {n: p.grad_sample for n, p in plain.named_parameters(recurse=False) if p.requires_grad}
    finally:
        gsm._close()


def check(module, args, K, split=rows_of, opacus=True, rtol=1e-4, atol=1e-5):
    """The module's rule against the loop and, for K=1 with examples, against Opacus."""
    spec = find_rule(module)
    assert spec is not None, type(module).__name__
    if spec.check is not None:
        spec.check(module)
    with torch.no_grad():
        y = module(*args)
    g = torch.randn_like(y)
    ours = spec.rule(module, args, g, K)
    ref = loop_reference(module, args, g, K, split)
    assert set(ours) == set(ref)
    for n in ref:
        assert ours[n].shape == ref[n].shape, n
        torch.testing.assert_close(ours[n], ref[n], rtol=rtol, atol=atol)
    # the same through the buffer blocks (out=)
    out = {n: torch.full((g.shape[0] // K, *p.shape), float("nan"), dtype=g.dtype)
           for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    written = spec.rule(module, args, g, K, out=out) if spec.writes_out else ours
    for n in ref:
        torch.testing.assert_close(written[n], ref[n], rtol=rtol, atol=atol)
    if opacus and K == 1 and g.shape[0] > 0 and ref:
        theirs = opacus_reference(module, args, g)
        for n in ref:
            torch.testing.assert_close(ours[n], theirs[n], rtol=rtol, atol=atol)


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


BK = [(2, 1), (2, 3), (0, 3)]


# -- RMSNorm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("shape,x_shape,eps,affine", [
    ((4,), (5, 4), None, True), ((4,), (3, 4), 1e-3, True), ((3, 4), (2, 3, 4), None, True),
    ((4,), (2, 4), None, False)])
def test_rms_norm_rule(B, K, shape, x_shape, eps, affine):
    torch.manual_seed(0)
    norm = nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    randomise(norm)
    check(norm, (torch.randn(B * K, *x_shape) * 0.1,), K)


def test_rms_norm_over_the_rows_is_refused():
    norm = nn.RMSNorm((3, 4))
    with pytest.raises(ValueError, match="mixes examples"):
        find_rule(norm).rule(norm, (torch.randn(3, 4),), torch.randn(3, 4), 1)


# -- InstanceNorm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("cls,size", [(nn.InstanceNorm1d, (7,)), (nn.InstanceNorm2d, (3, 4)),
                                      (nn.InstanceNorm3d, (2, 3, 2))])
@pytest.mark.parametrize("affine,track,train", [(True, False, True), (False, False, True), (True, True, True),
                                                 (True, True, False)])
def test_instance_norm_rule(B, K, cls, size, affine, track, train):
    torch.manual_seed(0)
    norm = cls(3, affine=affine, track_running_stats=track, eps=1e-3)
    randomise(norm)
    if track:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    norm.train(train)
    x = torch.randn(B * K, 3, *size)
    if B == 0:   # torch's instance_norm itself fails on 0 rows; the rule returns empty blocks
        got = find_rule(norm).rule(norm, (x,), torch.zeros_like(x), K)
        assert {n: t.shape for n, t in got.items()} == {n: (0, 3) for n in (("weight", "bias") if affine else ())}
        return
    # Opacus normalises with the row's own statistics and refuses running statistics
    check(norm, (x,), K, opacus=train and not track)   # (Opacus refuses layers with buffers)


# -- Conv1d / Conv3d --------------------------------------------------------------------------------

CONV1D = [dict(), dict(stride=2, padding=2, dilation=2), dict(groups=2, padding=1, bias=False),
          dict(padding="same", dilation=3), dict(padding="same", kernel_size=4), dict(padding="valid", stride=3),
          dict(padding=2, padding_mode="reflect"), dict(padding=1, padding_mode="circular", groups=2),
          dict(padding="same", kernel_size=4, padding_mode="replicate")]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("opts", CONV1D, ids=str)
def test_conv1d_rule(B, K, opts):
    torch.manual_seed(0)
    opts = {"kernel_size": 3, **opts}
    conv = nn.Conv1d(4, 6, **opts)
    # Opacus's conv sampler zero-pads whatever the padding_mode (its per-sample gradients are wrong there)
    check(conv, (torch.randn(B * K, 4, 11),), K, opacus=conv.padding_mode == "zeros")


@pytest.mark.parametrize("path", ["grouped", "loop", "unfold", "rows"])
def test_every_conv1d_path_matches_the_loop(path):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2)
    with force_path("conv1d", path):   # conv.py's Conv2d paths, run on a height-1 view, under their own key
        check(conv, (torch.randn(2 * 3, 3, 12),), 3, opacus=False)


CONV3D = [dict(), dict(stride=2, padding=1, dilation=(1, 2, 1)), dict(groups=2, bias=False, kernel_size=(1, 2, 3)),
          dict(padding="same", kernel_size=(2, 3, 1)), dict(padding=1, padding_mode="circular")]


@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("opts", CONV3D, ids=str)
def test_conv3d_rule(B, K, opts):
    torch.manual_seed(0)
    opts = {"kernel_size": 2, **opts}
    conv = nn.Conv3d(2, 4, **opts)
    check(conv, (torch.randn(B * K, 2, 4, 5, 4),), K, opacus=conv.padding_mode == "zeros")


@pytest.mark.parametrize("path", ["grouped", "loop", "rows"])
@pytest.mark.parametrize("cls", [nn.Conv3d, nn.ConvTranspose2d])
def test_every_nd_path_matches_the_loop(path, cls):
    torch.manual_seed(0)
    if cls is nn.Conv3d:
        conv, x, name = nn.Conv3d(4, 2, 2, stride=(1, 2, 1), groups=2), torch.randn(6, 4, 3, 5, 4), "conv3d"
    else:
        conv, x, name = nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1, groups=2), torch.randn(6, 4, 3, 4), \
            "conv_transpose2d"
    with force_path(name, path):
        check(conv, (x,), 3, opacus=False)


# -- ConvTranspose2d --------------------------------------------------------------------------------

CONVT = [dict(), dict(stride=2, padding=1, output_padding=1), dict(stride=(2, 3), output_padding=(1, 2), groups=2),
         dict(dilation=2, stride=1, output_padding=1, bias=False), dict(padding=(1, 0), dilation=(2, 1), groups=2)]


@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("opts", CONVT, ids=str)
def test_conv_transpose2d_rule(B, K, opts):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, **opts)
    check(conv, (torch.randn(B * K, 4, 4, 5),), K)


@pytest.mark.parametrize("K", [1, 2])
def test_conv_transpose2d_with_output_size(K):
    """output_size (a second positional argument) chooses the output padding: the rule reads it off g."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    check(conv, (torch.randn(2 * K, 3, 4, 4), [8, 7]), K, opacus=False)


# -- EmbeddingBag ----------------------------------------------------------------------------------

def bag_split(include_last=False):
    """Splits a 1-D input with offsets into group b's bags: its indices, offsets (and per-sample weights)."""
    def split(args, b, K):
        idx, offsets = args[0], args[1]
        n = offsets.shape[0] - int(include_last)
        start, stop = b * K, (b + 1) * K
        begin = int(offsets[start])
        end = int(offsets[stop]) if stop < n or include_last else idx.shape[0]
        sub = offsets[start:stop + int(include_last)] - begin
        return (idx[begin:end], sub, *(a[begin:end] if isinstance(a, torch.Tensor) else a for a in args[2:]))
    return split


def offsets_of(lengths, include_last):
    off = torch.tensor([0] + list(lengths)).cumsum(0)
    return off if include_last else off[:-1]


@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("pad", [None, 0])
def test_embedding_bag_2d_rule(B, K, mode, pad):
    torch.manual_seed(0)
    bag = randomise(nn.EmbeddingBag(6, 3, mode=mode, padding_idx=pad))
    idx = torch.randint(0, 6, (B * K, 4))
    if B:
        idx[0] = 0   # an all-padding bag (empty when pad=0)
        idx[-1, :2] = 3  # duplicates in a bag
    # Opacus's EmbeddingBag sampler takes (input, offsets) and ignores padding, duplicates and max
    check(bag, (idx,), K, opacus=False)


@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("pad,include_last", [(None, False), (2, False), (None, True)])
def test_embedding_bag_offsets_rule(B, K, mode, pad, include_last):
    torch.manual_seed(0)
    bag = randomise(nn.EmbeddingBag(7, 3, mode=mode, padding_idx=pad, include_last_offset=include_last))
    lengths = torch.randint(0, 4, (B * K,)).tolist()
    if B:
        lengths[0] = 0     # an empty bag
    idx = torch.randint(0, 7, (sum(lengths),))
    offsets = offsets_of(lengths, include_last)
    check(bag, (idx, offsets), K, split=bag_split(include_last), opacus=False)


@pytest.mark.parametrize("B,K", BK)
@pytest.mark.parametrize("two_d", [True, False])
def test_embedding_bag_per_sample_weights(B, K, two_d):
    torch.manual_seed(0)
    bag = randomise(nn.EmbeddingBag(5, 2, mode="sum", padding_idx=1))
    if two_d:
        idx = torch.randint(0, 5, (B * K, 3))
        check(bag, (idx, None, torch.randn(B * K, 3)), K, opacus=False)
    else:
        lengths = torch.randint(0, 4, (B * K,)).tolist()
        idx = torch.randint(0, 5, (sum(lengths),))
        check(bag, (idx, offsets_of(lengths, False), torch.randn(idx.shape[0])), K, split=bag_split(), opacus=False)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_matches_opacus(mode):
    """Opacus's sampler covers 1-D input with offsets, no padding, no repeated index within a bag."""
    torch.manual_seed(0)
    bag = randomise(nn.EmbeddingBag(9, 3, mode=mode))
    idx = torch.tensor([0, 4, 7, 2, 5, 1, 8, 3])
    check(bag, (idx, torch.tensor([0, 3, 4, 6])), 1, split=bag_split())


@pytest.mark.parametrize("opts", [dict(max_norm=1.0), dict(scale_grad_by_freq=True)])
def test_embedding_bag_options_are_refused(opts):
    with pytest.raises(NotImplementedError):
        find_rule(nn.EmbeddingBag(5, 2, **opts)).check(nn.EmbeddingBag(5, 2, **opts))


# -- SequenceBias -----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,K", BK)
def test_sequence_bias_rule(B, K):
    torch.manual_seed(0)
    check(SequenceBias(4, batch_first=True), (torch.randn(B * K, 3, 4),), K)


def test_every_rule_is_found():
    from opacus.layers.dp_multihead_attention import SequenceBias as SB
    from dpdm_fast.engine.capture.rules import conv_nd, conv_transpose, embedding_bag, instance_norm, rms_norm
    from dpdm_fast.engine.capture.rules import sequence_bias
    expected = {nn.RMSNorm(3): rms_norm.rms_norm_rule,
                nn.InstanceNorm1d(2, affine=True): instance_norm.instance_norm_rule,
                nn.InstanceNorm2d(2, affine=True): instance_norm.instance_norm_rule,
                nn.InstanceNorm3d(2, affine=True): instance_norm.instance_norm_rule,
                nn.Conv1d(2, 2, 1): conv_nd.conv1d_rule, nn.Conv3d(2, 2, 1): conv_nd.conv3d_rule,
                nn.ConvTranspose2d(2, 2, 1): conv_transpose.conv_transpose2d_rule,
                nn.EmbeddingBag(3, 2): embedding_bag.embedding_bag_rule, SB(3): sequence_bias.sequence_bias_rule}
    for module, rule in expected.items():
        assert find_rule(module) is not None and find_rule(module).rule is rule, type(module).__name__


# -- through the engine -----------------------------------------------------------------------------

class Mixed(nn.Module):
    """Conv1d, InstanceNorm1d, RMSNorm, an EmbeddingBag called with 1-D input + offsets, Conv3d, ConvTranspose2d."""

    def __init__(self, keyword_offsets=False):
        super().__init__()
        self.keyword_offsets = keyword_offsets
        self.conv1 = nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect")
        self.inorm = nn.InstanceNorm1d(3, affine=True)
        self.rms, self.bag = nn.RMSNorm(5), nn.EmbeddingBag(9, 5, mode="mean", padding_idx=0)
        self.conv3, self.convt = nn.Conv3d(1, 2, 2), nn.ConvTranspose2d(2, 1, 2, stride=2, output_padding=1)
        self.head = nn.Linear(3 * 5 + 5 + 2 + 1, 1)
        randomise(self)

    def forward(self, x, idx, v):
        h = self.inorm(self.conv1(x))                                       # (N, 3, 5)
        h = self.rms(h).flatten(1)
        flat, offsets = idx.reshape(-1), torch.arange(0, idx.numel(), idx.shape[1])
        e = self.bag(flat, offsets=offsets) if self.keyword_offsets else self.bag(flat, offsets)
        c = self.conv3(v).mean(dim=(2, 3, 4))                                # (N, 2)
        t = self.convt(v[:, :, 0, :, :].expand(-1, 2, -1, -1)).mean(dim=(1, 2, 3))[:, None]
        return self.head(torch.cat([h, e, c, t], 1)).squeeze(-1)


def mixed_rows(N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 2, 5, generator=gen), torch.randint(0, 9, (N, 3), generator=gen),
            torch.randn(N, 1, 3, 3, 3, generator=gen), torch.randn(N, generator=gen))


@pytest.mark.parametrize("K", [1, 2])
def test_a_model_of_the_new_layers_matches_the_loop(K):
    from dpdm_fast.engine.reference import per_example_loop_update
    from engine_helpers import flat_grad, rel, zero_noise_engine
    torch.manual_seed(0)
    B, C = 3, 0.5
    rows = mixed_rows(B * K)
    loss_rows = lambda m, x, idx, v, t: (m(x, idx, v) - t) ** 2  # noqa: E731
    net = Mixed()
    ref = per_example_loop_update(copy.deepcopy(net), loss_rows, rows, K, C, B)
    pm, opt = zero_noise_engine(net, K, C, B)
    assert set(pm.computed_by().values()) == {"torch rule"}
    loss_rows(pm, *rows).mean().backward()
    opt.step()
    assert rel(flat_grad(net), ref) < 1e-5


def test_embedding_bag_offsets_as_a_keyword_are_refused():
    from engine_helpers import zero_noise_engine
    pm, _ = zero_noise_engine(Mixed(keyword_offsets=True), 1, 1.0, 2)
    x, idx, v, _ = mixed_rows(2)
    with pytest.raises(NotImplementedError, match="positionally"):
        pm(x, idx, v)


class SeqFirstAttentionWithBias(nn.Module):
    """DPMultiheadAttention(add_bias_kv=True): its SequenceBias layers run sequence-first (rows on dim 1)."""

    def __init__(self):
        super().__init__()
        self.emb, self.attn = nn.Embedding(11, 4), DPMultiheadAttention(4, 2, add_bias_kv=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.emb(x)
        h, _ = self.attn(h, h, h)
        return self.fc(h).mean(0)


@pytest.mark.parametrize("K", [1, 2])
def test_sequence_bias_in_a_batch_first_false_model_matches_the_loop(K):
    from dpdm_fast.engine import DPOptimizer, PrivateModule
    from dpdm_fast.engine.reference import per_example_loop_update
    from engine_helpers import flat_grad, rel
    torch.manual_seed(0)
    model = SeqFirstAttentionWithBias()
    with torch.no_grad():
        model.attn.seq_bias_k.bias.normal_()
        model.attn.seq_bias_v.bias.normal_()
    plain = copy.deepcopy(model)
    x, y = torch.randint(0, 11, (3 * K, 4)), torch.randint(0, 2, (3 * K,))
    ce = lambda m, x, y: F.cross_entropy(m(x.t()), y, reduction="none")  # noqa: E731
    pm = PrivateModule(model, noise_multiplicity=K, max_grad_norm=0.1, batch_first=False)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm.collector, noise_multiplier=0.0,
                      expected_batch_size=3)
    ce(pm, x, y).mean().backward()
    opt.step()
    assert pm.computed_by()["attn.seq_bias_k"] == pm.computed_by()["attn.seq_bias_v"] == "torch rule"
    assert rel(flat_grad(model), per_example_loop_update(plain, ce, (x, y), K, 0.1, 3)) < 1e-5


def test_sequence_bias_with_its_rows_on_dim_1_in_a_batch_first_model_is_refused():
    """DPMultiheadAttention(batch_first=True) still runs its SequenceBias layers sequence-first: their rows are
    not the model's dim 0, so the engine refuses the call (Opacus's sampler would take backprops[:, -1] there)."""
    from dpdm_fast.engine import PrivateModule

    class BatchFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn = nn.Embedding(11, 4), DPMultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            return self.attn(*(self.emb(x),) * 3)[0].mean(1)

    pm = PrivateModule(BatchFirst(), noise_multiplicity=1, max_grad_norm=0.1)
    with pytest.raises(ValueError, match="seq_bias_k"):
        pm(torch.randint(0, 11, (3, 4)))
