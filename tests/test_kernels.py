"""Every Triton kernel against the torch backend's rule and its own torch reference.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) at small shapes;
on a GPU natively. Shapes include sizes that do not divide the tiles, B=1, K=1, 1x1 maps, stride 2,
and bf16 operands (accumulated in fp32: products of bf16 numbers are exact in fp32, so the kernel
must match an fp32 computation on the same bf16 values closely).
"""
import math

import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl

from conftest import DEVICE
from dpdm_fast.engine.capture.rules.conv import conv2d_rule
from dpdm_fast.engine.capture.rules.linear import linear_rule
from dpdm_fast.engine.capture.rules.nin import nin_rule
from dpdm_fast.engine.capture.rules.norm import group_norm_rule
from dpdm_fast.kernels.clip_noise import TILE, _normal_from_bits, clip_reduce, reference_clip_reduce, tile_table
from dpdm_fast.kernels.conv_weight_grad import conv2d_weight_grad, reference_conv2d_weight_grad
from dpdm_fast.kernels.group_gemm import group_gemm, reference_group_gemm
from dpdm_fast.kernels.group_norm_grad import group_norm_grad, reference_group_norm_grad
from dpdm_fast.kernels.group_sum import group_sum, reference_group_sum
from dpdm_fast.models.layers import NIN


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def tol(dtype):
    return 2e-5 if dtype == torch.float32 else 1e-4   # bf16: same bf16 values, fp32 sums in another order


def sqnorms(t):
    return t.float().flatten(1).pow(2).sum(1)


CONV_CASES = [  # B, K, C, O, H, kernel, stride, padding, dtype
    (2, 3, 5, 7, 9, 3, 1, 1, torch.float32),
    (1, 1, 4, 4, 1, 1, 1, 0, torch.float32),       # B=1, K=1, 1x1 map, 1x1 kernel
    (2, 2, 3, 6, 1, 3, 1, 1, torch.float32),       # 3x3 kernel on a 1x1 map (all but the centre is padding)
    (3, 2, 6, 5, 8, 3, 2, 1, torch.float32),       # stride 2 (the U-Net's downsampling conv)
    (2, 2, 17, 33, 7, 3, 1, 1, torch.float32),     # channels that divide no tile
    (2, 4, 8, 16, 6, 1, 1, 0, torch.bfloat16),     # 1x1 (NIN-like skip conv)
    (3, 2, 6, 5, 5, 3, 2, 1, torch.bfloat16),
]


@pytest.mark.parametrize("B,K,C,O,H,k,s,p,dtype", CONV_CASES)
def test_conv_weight_grad_matches_the_torch_rule(B, K, C, O, H, k, s, p, dtype):
    torch.manual_seed(B * 100 + C)
    conv = nn.Conv2d(C, O, k, stride=s, padding=p).to(DEVICE)
    x = torch.randn(B * K, C, H, H, device=DEVICE).to(dtype)
    g = torch.randn(B * K, O, *conv(x.float()).shape[2:], device=DEVICE).to(dtype)
    out, sq = conv2d_weight_grad(x, g, K, tuple(conv.weight.shape), (s, s), (p, p))
    want = conv2d_rule(conv, (x.float(),), g.float(), K)["weight"]
    assert rel(out, want) < tol(dtype)
    assert rel(out, reference_conv2d_weight_grad(x, g, K, tuple(conv.weight.shape), (s, s), (p, p))) < tol(dtype)
    assert rel(sq, sqnorms(want)) < 1e-4


def test_conv_weight_grad_writes_into_a_buffer_block_and_adds_to_the_norm():
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    g = torch.randn(4, 2, 5, 5, device=DEVICE)
    storage = torch.full((7 + 2 * 2 * 3 * 9,), float("nan"), device=DEVICE)
    blk = storage[7:].view(2, 2, 3, 3, 3)
    sq = torch.full((2,), 10.0, device=DEVICE)
    conv2d_weight_grad(x, g, 2, (2, 3, 3, 3), (1, 1), (1, 1), blk, sq)
    want = reference_conv2d_weight_grad(x, g, 2, (2, 3, 3, 3), (1, 1), (1, 1))
    assert rel(blk, want) < 2e-5 and storage[:7].isnan().all()       # nothing outside its block
    assert rel(sq, 10 + sqnorms(want)) < 1e-5                       # added, not overwritten


@pytest.mark.parametrize("B,K,T,fin,fout,dtype", [(2, 3, 1, 7, 5, torch.float32), (1, 1, 1, 33, 17, torch.float32),
                                                  (3, 2, 4, 6, 9, torch.float32), (2, 2, 3, 20, 40, torch.bfloat16)])
def test_linear_kernels_match_the_torch_rule(B, K, T, fin, fout, dtype):
    from dpdm_fast.engine.capture.kernel_rules import triton_kernel_rules
    torch.manual_seed(T * 10 + fin)
    lin = nn.Linear(fin, fout).to(DEVICE)
    shape = (B * K, fin) if T == 1 else (B * K, T, fin)
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    g = torch.randn(*shape[:-1], fout, device=DEVICE).to(dtype)
    want = linear_rule(lin, (x.float(),), g.float(), K)
    out = {"weight": torch.empty(B, fout, fin, device=DEVICE), "bias": torch.empty(B, fout, device=DEVICE)}
    sq = {n: torch.zeros(B, device=DEVICE) for n in out}
    assert triton_kernel_rules()[nn.Linear](lin, x, g, K, out, sq)
    for n in out:
        assert rel(out[n], want[n]) < tol(dtype) and rel(sq[n], sqnorms(want[n])) < 1e-4


@pytest.mark.parametrize("B,K,C,O,H,dtype", [(2, 3, 8, 8, 4, torch.float32), (1, 1, 5, 19, 1, torch.float32),
                                             (2, 2, 16, 24, 3, torch.bfloat16)])
def test_nin_kernels_match_the_torch_rule(B, K, C, O, H, dtype):
    from dpdm_fast.engine.capture.kernel_rules import triton_kernel_rules
    torch.manual_seed(C)
    nin = NIN(C, O).to(DEVICE)
    with torch.no_grad():
        nin.b.normal_()
    x = torch.randn(B * K, C, H, H, device=DEVICE).to(dtype)
    g = torch.randn(B * K, O, H, H, device=DEVICE).to(dtype)
    want = nin_rule(nin, (x.float(),), g.float(), K)
    out = {"W": torch.empty(B, C, O, device=DEVICE), "b": torch.empty(B, O, device=DEVICE)}
    sq = {n: torch.zeros(B, device=DEVICE) for n in out}
    assert triton_kernel_rules()[NIN](nin, x, g, K, out, sq)
    for n in out:
        assert rel(out[n], want[n]) < tol(dtype) and rel(sq[n], sqnorms(want[n])) < 1e-4
    assert rel(out["W"], reference_group_gemm(x.reshape(B * K, C, -1), g.reshape(B * K, O, -1), K)) < tol(dtype)


@pytest.mark.parametrize("N,M,S,K", [(6, 7, 19, 3), (1, 1, 1, 1), (4, 33, 130, 2)])
def test_group_sum_and_gemm_on_strided_views(N, M, S, K):
    a = torch.randn(N, S, M, device=DEVICE).transpose(1, 2)      # (N, M, S), not contiguous
    c = torch.randn(N, 5, S, device=DEVICE)
    out, sq = group_sum(a, K)
    assert rel(out, reference_group_sum(a, K)) < 2e-5 and rel(sq, sqnorms(reference_group_sum(a, K))) < 1e-4
    out, sq = group_gemm(a, c, K)
    assert rel(out, reference_group_gemm(a, c, K)) < 2e-5


@pytest.mark.parametrize("B,K,C,G,H,dtype", [(2, 3, 8, 4, 5, torch.float32), (1, 1, 6, 2, 1, torch.float32),
                                             (3, 2, 32, 8, 7, torch.float32), (2, 2, 12, 3, 4, torch.bfloat16)])
@pytest.mark.parametrize("with_stats", [True, False])
def test_group_norm_kernel_matches_the_torch_rule(B, K, C, G, H, dtype, with_stats):
    from dpdm_fast.engine.capture.kernel_rules import triton_kernel_rules
    torch.manual_seed(C + H)
    gn = nn.GroupNorm(G, C).to(DEVICE)
    x = (torch.randn(B * K, C, H, H, device=DEVICE) * 3 + 1).to(dtype)
    g = torch.randn(B * K, C, H, H, device=DEVICE).to(dtype)
    want = group_norm_rule(gn, (x.float(),), g.float(), K)
    saved = torch.native_group_norm(x.float(), None, None, B * K, C, H * H, G, gn.eps)[1:] if with_stats else None
    out = {"weight": torch.empty(B, C, device=DEVICE), "bias": torch.empty(B, C, device=DEVICE)}
    sq = {n: torch.zeros(B, device=DEVICE) for n in out}
    assert triton_kernel_rules()[nn.GroupNorm](gn, x, g, K, out, sq, saved)
    for n in out:
        assert rel(out[n], want[n]) < 1e-4 and rel(sq[n], sqnorms(want[n])) < 1e-4
    assert rel(out["weight"], reference_group_norm_grad(x, g, G, gn.eps, K)[0]) < 1e-4


def test_group_norm_kernel_writes_only_what_is_asked():
    x = torch.randn(4, 4, 3, device=DEVICE)
    mean, rstd = torch.native_group_norm(x, None, None, 4, 4, 3, 2, 1e-5)[1:]
    db = torch.empty(2, 4, device=DEVICE)
    sq_b = torch.zeros(2, device=DEVICE)
    group_norm_grad(x, x, mean, rstd, 2, None, db, None, sq_b)
    assert rel(db, x.reshape(2, 2, 4, 3).sum(dim=(1, 3))) < 1e-5 and rel(sq_b, sqnorms(db)) < 1e-5


# -- the clip / sum / noise pass ------------------------------------------------------------------
def _buffer(numels, B, written, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = sum(numels)
    buf = torch.randn(B * P, generator=g).to(DEVICE)
    offset = 0
    for n, w in zip(numels, written):
        if not w:
            buf[B * offset:B * (offset + n)] = float("nan")   # stale data the pass must not read
        offset += n
    return buf, torch.tensor(written, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("numels,B", [([5, 1030, 7, 2100], 3), ([1], 1), ([TILE + 3, 2], 2)])
def test_clip_reduce_matches_the_reference(numels, B):
    written = [i % 3 != 2 for i in range(len(numels))]
    buf, w = _buffer(numels, B, written)
    norms = torch.rand(B, device=DEVICE) * 3          # some above the clip norm 1, some below
    total = torch.randn(sum(numels), device=DEVICE)
    want = reference_clip_reduce(buf, numels, w, norms, 1.0, 0.5, total.clone())
    got = clip_reduce(buf, numels, w, norms, 1.0, 0.5, total.clone())
    assert got.isfinite().all() and rel(got, want) < 1e-5
    out = torch.empty_like(total)
    clip_reduce(buf, numels, w, norms, 1.0, 0.5, total.clone(), final=True, std=0.0, divisor=7.0, out=out)
    assert rel(out, want / 7) < 1e-5


@pytest.mark.parametrize("numels,B", [([5, 1030, 7, 2100], 3), ([TILE + 3, 2], 2)])
def test_per_layer_clip_reduce_matches_the_reference(numels, B):
    """Per-layer factors: each parameter's tiles use its own bound and its row of the norm table."""
    written = [i % 3 != 2 for i in range(len(numels))]
    buf, w = _buffer(numels, B, written)
    norms = (torch.rand(len(numels), B, device=DEVICE) * 3).contiguous()
    bounds = torch.tensor([0.5, 1.0, 2.0, 0.25][:len(numels)], device=DEVICE)
    total = torch.randn(sum(numels), device=DEVICE)
    want = reference_clip_reduce(buf, numels, w, norms, 99.0, 0.5, total.clone(), bounds=bounds)
    got = clip_reduce(buf, numels, w, norms, 99.0, 0.5, total.clone(), bounds=bounds)
    assert got.isfinite().all() and rel(got, want) < 1e-5
    flat = reference_clip_reduce(buf, numels, w, norms[0], 1.0, 0.5, total.clone())
    assert rel(got, flat) > 1e-3                      # the per-layer factors changed the sum
    with pytest.raises(ValueError, match="norm table"):
        clip_reduce(buf, numels, w, norms[0], 1.0, 0.5, total.clone(), bounds=bounds)


def test_clip_factors_bound_every_examples_norm():
    """One example, one parameter: the clipped sum has norm min(norm, C)."""
    for norm_scale in (0.3, 30.0):
        row = torch.randn(50, device=DEVICE)
        row *= norm_scale / row.norm()
        norms = row.norm().reshape(1)
        total = clip_reduce(row.clone(), [50], torch.ones(1, dtype=torch.int32, device=DEVICE), norms, 1.0, 1.0,
                            torch.zeros(50, device=DEVICE))
        assert abs(total.norm().item() - min(norm_scale, 1.0)) < 1e-4


@pytest.mark.parametrize("draws", [1, 4])
def test_noise_has_the_right_mean_and_std_and_follows_the_seed(draws):
    P = 200_000
    zeros, none = torch.zeros(P, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)

    def noise(seed, std=2.0, divisor=4.0):
        out = torch.empty(P, device=DEVICE)
        return clip_reduce(zeros, [P], none, torch.zeros(1, device=DEVICE), 1.0, 1.0, zeros.clone(), final=True,
                           std=std, divisor=divisor, seed=seed, draws=draws, out=out)
    a = noise(1234)
    # std * z / divisor with z ~ N(0, 1): mean 0 +- 5 standard errors, std 0.5 within 1%
    assert abs(a.mean().item()) < 5 * 0.5 / math.sqrt(P) and abs(a.std().item() / 0.5 - 1) < 0.01
    assert torch.equal(a, noise(1234))                           # same seed (step): the same noise
    b = noise(1235)                                               # the next step's seed: independent noise
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01
    # no periodicity across tiles: neighbouring tiles are not copies of each other
    t = min(TILE, P // 2)
    assert not torch.allclose(a[:t], a[t:2 * t])


@triton.jit
def _normal_probe(a_ptr, b_ptr, c_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    out = _normal_from_bits(tl.load(a_ptr + i).to(tl.uint32), tl.load(b_ptr + i).to(tl.uint32),
                            tl.load(c_ptr + i).to(tl.uint32))
    tl.store(out_ptr + i, out)


def test_gaussian_transform_reaches_far_tails_and_maps_bits_as_documented():
    """The radius uses 53 random bits: the smallest uniform gives a draw of 8.65 standard deviations
    (an fp32 transform such as tl.randn's stops at 5.7), the largest gives ~0."""
    top = 2**32 - 1
    a = torch.tensor([0, top, 0, 2**31], dtype=torch.int64, device=DEVICE)
    b = torch.tensor([0, top, 0, 0], dtype=torch.int64, device=DEVICE)
    c = torch.tensor([0, 0, 2**31, 2**30], dtype=torch.int64, device=DEVICE)
    out = torch.empty(4, device=DEVICE)
    _normal_probe[(1,)](a, b, c, out, 4)
    want = [math.sqrt(2 * 54 * math.log(2)), 0.0, -math.sqrt(2 * 54 * math.log(2)), 0.0]
    assert out.tolist() == pytest.approx(want, abs=1e-4)


def test_tile_table_covers_every_column_once():
    numels = [3, TILE, TILE + 1, 1]
    tiles = tile_table(numels, "cpu")
    covered = torch.zeros(sum(numels), dtype=torch.int64)
    for off, n, start, _ in tiles.tolist():
        covered[off + start:off + min(n, start + TILE)] += 1
    assert covered.eq(1).all()


def test_kernels_refuse_bad_outputs():
    x, g = torch.randn(2, 3, 4, 4, device=DEVICE), torch.randn(2, 2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous fp32"):
        conv2d_weight_grad(x, g, 1, (2, 3, 3, 3), (1, 1), (1, 1), torch.empty(2, 2, 3, 3, 3, dtype=torch.float64,
                                                                              device=DEVICE))
    with pytest.raises(ValueError, match="do not fit"):
        conv2d_weight_grad(x, g, 2, (2, 5, 3, 3), (1, 1), (1, 1))
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        group_sum(torch.ones(2, 2, 2, dtype=torch.int64, device=DEVICE), 1)


def test_every_kernel_compiles_to_a_cubin_for_sm70_to_sm90():
    """The interpreter runs the kernels' Python, not their compilation: compile each one ahead of
    time (TTIR -> PTX -> cubin with Triton's ptxas; no GPU needed) with the launchers' argument
    types and constants, so a kernel that would not compile for a GPU fails here. sm_70 (V100) and
    sm_75 (T4) too: backend='auto' picks Triton on them (engine.clipping.backends.auto_choice)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-m", "dpdm_fast.kernels.compile_check", "--arch", "70,75,80,90"], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "100/100 kernel variants compiled" in out.stdout


@pytest.mark.parametrize("capability, expected", [((7, 0), "triton"), ((7, 5), "triton"), ((9, 0), "triton"),
                                                  ((6, 1), "torch")])
def test_auto_picks_triton_on_every_gpu_the_kernels_compile_for(capability, expected, monkeypatch):
    from dpdm_fast.engine.clipping import backends
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    name, reason = backends.auto_choice(torch.device("cuda"))
    assert name == expected and (reason is None) == (expected == "triton")
    assert backends.auto_choice(torch.device("cpu")) == ("torch", None)
