"""The whole DPDM update against Opacus 'hooks' + K-averaging and a per-example loop (noise 0)."""
import warnings

import pytest
import torch

from dpdm_fast.engine.reference import opacus_k_averaged_update, per_example_loop_update
from engine_helpers import celeba_net, dpdm_rows, flat_grad, mnist_net, rel, row_losses, zero_noise_engine


def engine_update(net, loss, rows, K, C, expected, reduction="mean"):
    pm, opt = zero_noise_engine(net, K, C, expected, reduction)
    losses = row_losses(loss, pm, *rows)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    opt.step()
    out = flat_grad(net)
    norms = pm.collector.last_norms
    pm.remove_hooks()
    for p in net.parameters():
        p.grad = None
    return out, norms


@pytest.mark.parametrize("make_net,channels,size,labels", [(mnist_net, 1, 28, True), (celeba_net, 3, 32, False)],
                         ids=["mnist28", "celeba32"])
@pytest.mark.parametrize("C", [0.1, 1e3])  # some clipped, none clipped
def test_dpdm_network_matches_opacus_hooks_with_k_averaging(make_net, channels, size, labels, C):
    K, B = 3, 2
    net = make_net()
    loss, rows = dpdm_rows(B, K, channels, size, labels)
    ours, norms = engine_update(net, loss, rows, K, C, expected=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = opacus_k_averaged_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, C, 4)
    if C < 1:
        assert (norms > C).all()  # the clipping path is really exercised
    assert rel(ours, ref) < 1e-5


def test_matches_per_example_loop_with_sum_reduction():
    K, B, C = 2, 3, 0.5
    net = mnist_net(1)
    loss, rows = dpdm_rows(B, K, seed=1)
    ours, _ = engine_update(net, loss, rows, K, C, expected=1, reduction="sum")
    # with a sum over rows, Opacus's per-row gradient is that of the row loss, as with 'mean'
    ref = per_example_loop_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, C, 1)
    assert rel(ours, ref) < 1e-5


def test_average_over_k_not_sum():
    """Doubling K with duplicated rows leaves each example's gradient (and so the update) unchanged."""
    net = mnist_net(2)
    loss, rows = dpdm_rows(2, 2, seed=2)
    doubled = [r.repeat_interleave(2, dim=0) if r is not None else None for r in rows]
    a, norms_a = engine_update(net, loss, rows, 2, 1e3, 2)
    b, norms_b = engine_update(net, loss, doubled, 4, 1e3, 2)
    assert rel(b, a) < 1e-5 and torch.allclose(norms_a, norms_b, rtol=1e-5)
