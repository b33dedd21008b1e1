"""Engine correctness on a CUDA device (run by bench/gpu_check.sh; skipped without a GPU)."""
import os
import warnings

import pytest
import torch

from dpdm_fast.engine.reference import opacus_k_averaged_update, per_example_loop_update
from engine_helpers import celeba_net, dpdm_rows, mnist_net, rel, row_losses, zero_noise_engine

DEVICE = os.environ.get("DPDM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(not (DEVICE.startswith("cuda") and torch.cuda.is_available()),
                                reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fp32_without_tf32():
    """Every test's fp32 is true fp32 (TF32 off, as on the CPU), restored after it: no test depends on order."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on_device(rows):
    return tuple(None if r is None else r.to(DEVICE) for r in rows)


def _engine_update(net, loss, rows, K, C, expected, autocast=False, backend="auto", scaler=None):
    pm, opt = zero_noise_engine(net, K, C, expected, backend=backend)
    if scaler is not None:   # one pass of all the examples: its mean is the sum over them / examples_per_pass
        opt.attach_grad_scaler(scaler, examples_per_pass=len(rows[0]) // K)
    dtype = torch.float16 if scaler is not None else torch.bfloat16
    with torch.autocast("cuda", dtype=dtype, enabled=autocast):
        losses = row_losses(loss, pm, *rows)
    total = losses.float().mean()
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    out = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    pm.remove_hooks()
    for p in net.parameters():
        p.grad = None
    return out


@pytest.mark.parametrize("B,K", [(4, 4), (16, 8)])
def test_dpdm_net_on_gpu_matches_per_example_loop(B, K):
    net = mnist_net().to(DEVICE)
    loss, rows = dpdm_rows(B, K)
    rows = _on_device(rows)
    ours = _engine_update(net, loss, rows, K, 0.1, B)
    ref = per_example_loop_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, 0.1, B)
    assert rel(ours, ref) < 1e-4


def test_dpdm_net_on_gpu_matches_opacus():
    pytest.importorskip("opacus")
    net = mnist_net().to(DEVICE)
    loss, rows = dpdm_rows(4, 4)
    rows = _on_device(rows)
    ours = _engine_update(net, loss, rows, 4, 0.1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = opacus_k_averaged_update(net, lambda m, *r: row_losses(loss, m, *r), rows, 4, 0.1, 4)
    assert rel(ours, ref) < 1e-4


@pytest.mark.parametrize("amp, tolerance", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_autocast_on_gpu_close_to_fp32(amp, tolerance):
    """bf16 autocast, and fp16 autocast with a fixed-scale GradScaler attached (unscaled before clipping)."""
    net = mnist_net().to(DEVICE)
    loss, rows = dpdm_rows(8, 4)
    rows = _on_device(rows)
    fp32 = _engine_update(net, loss, rows, 4, 0.1, 8)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_interval=10**9) if amp == "fp16" else None
    low = _engine_update(net, loss, rows, 4, 0.1, 8, autocast=True, scaler=scaler)
    assert rel(low, fp32) < tolerance


@pytest.mark.parametrize("network", ["mnist", "celeba"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_every_backend_on_the_published_networks_matches_the_per_example_loop(backend, network):
    """The published MNIST (1.75M) and CelebA-32 networks, B=4 examples x K=4 rows, clip 0.1 (all clipped)."""
    if backend == "cuda":
        from dpdm_fast.csrc import unavailable_reason
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    net = (mnist_net() if network == "mnist" else celeba_net()).to(DEVICE)
    channels, size = (1, 28) if network == "mnist" else (3, 32)
    loss, rows = dpdm_rows(4, 4, channels=channels, size=size, labels=network == "mnist")
    rows = _on_device(rows)
    ours = _engine_update(net, loss, rows, 4, 0.1, 4, backend=backend)
    ref = per_example_loop_update(net, lambda m, *r: row_losses(loss, m, *r), rows, 4, 0.1, 4)
    assert rel(ours, ref) < 1e-4


def test_a_resume_continues_the_gpu_dropout_stream():
    """The trainer's resume state holds the GPU's generator (dropout's on a GPU): restored, its next draws
    are those an uninterrupted run would make."""
    from dpdm_fast.training.loop import dropout_rng_state, restore_dropout_rng
    device = torch.device(DEVICE)
    torch.manual_seed(3)
    torch.rand(5, device=device)
    saved = dropout_rng_state(device)
    uninterrupted = torch.rand(100, device=device)
    torch.manual_seed(4)   # a fresh process seeds the generators anew
    restore_dropout_rng(saved, device)
    assert torch.equal(torch.rand(100, device=device), uninterrupted)
