"""Engine correctness on a CUDA device (run by bench/gpu_check.sh; skipped without a GPU)."""
import os
import warnings

import pytest
import torch

from dpdm_fast.engine.reference import opacus_k_averaged_update, per_example_loop_update
from engine_helpers import dpdm_rows, mnist_net, rel, row_losses, zero_noise_engine

DEVICE = os.environ.get("DPDM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(not (DEVICE.startswith("cuda") and torch.cuda.is_available()),
                                reason="needs a CUDA GPU")


def _engine_update(net, loss, rows, K, C, expected, autocast=False):
    pm, opt = zero_noise_engine(net, K, C, expected)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        losses = row_losses(loss, pm, *rows)
    losses.float().mean().backward()
    opt.step()
    out = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    pm.remove_hooks()
    for p in net.parameters():
        p.grad = None
    return out


@pytest.mark.parametrize("B,K", [(4, 4), (16, 8)])
def test_dpdm_net_on_gpu_matches_per_example_loop(B, K):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    net = mnist_net().to(DEVICE)
    loss, rows = dpdm_rows(B, K)
    rows = tuple(r.to(DEVICE) for r in rows)
    ours = _engine_update(net, loss, rows, K, 0.1, B)
    ref = per_example_loop_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, 0.1, B)
    assert rel(ours, ref) < 1e-4


def test_dpdm_net_on_gpu_matches_opacus():
    pytest.importorskip("opacus")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    net = mnist_net().to(DEVICE)
    loss, rows = dpdm_rows(4, 4)
    rows = tuple(r.to(DEVICE) for r in rows)
    ours = _engine_update(net, loss, rows, 4, 0.1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = opacus_k_averaged_update(net, lambda m, *r: row_losses(loss, m, *r), rows, 4, 0.1, 4)
    assert rel(ours, ref) < 1e-4


def test_bf16_autocast_on_gpu_close_to_fp32():
    net = mnist_net().to(DEVICE)
    loss, rows = dpdm_rows(8, 4)
    rows = tuple(r.to(DEVICE) for r in rows)
    fp32 = _engine_update(net, loss, rows, 4, 0.1, 8)
    bf16 = _engine_update(net, loss, rows, 4, 0.1, 8, autocast=True)
    assert rel(bf16, fp32) < 5e-2
