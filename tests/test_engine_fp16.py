"""fp16 autocast with torch.amp.GradScaler (issue 25 item 2): the per-example gradients are unscaled before
their norms are compared with the clip bound, the noise is added at the unscaled scale, an overflowing
example contributes zero instead of skipping the step, and the scaler's scale never depends on the data.

The references: the same batch in fp32 without a scaler, and the per-example autograd loop.
"""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dpdm_fast.engine import DPOptimizer, PrivateModule
from dpdm_fast.engine.reference import per_example_loop_update
from engine_helpers import dpdm_rows, flat_grad, mnist_net, rel, row_losses

warnings.filterwarnings("ignore", message="Secure RNG turned off")

B, K = 3, 2


def fixed_scaler(scale: float) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**9)


def dp_update(scaler=None, fp16=False, C=0.05, noise=0.0, weights=None, examples=slice(None), attach=True,
              per_pass=True):
    """p.grad after one DP step of the DPDM network on B examples x K rows (SGD at lr 0: p.grad is the update),
    the collector's overflow count after the backward, and the per-example norms. ``weights``: a factor per
    example on its rows' losses; ``examples``: the examples in the batch (the expected batch size stays B).
    ``per_pass``: the scaled loss is the sum over rows / (B K) (attached with examples_per_pass=B, the
    trainer's way); else divided by this pass's own size (its mean, as a loop without a public P would)."""
    net = mnist_net()
    pm = PrivateModule(net, noise_multiplicity=K, max_grad_norm=C)
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), pm.collector, noise_multiplier=noise,
                      expected_batch_size=B, generator=torch.Generator().manual_seed(7))
    n = len(range(B)[examples])            # the examples of this pass
    P = B if per_pass else n                # per_pass=False: sum / (n K) = this pass's mean
    if scaler is not None and attach:
        opt.attach_grad_scaler(scaler, examples_per_pass=P)
    loss, (clean, sigma, eps, y) = dpdm_rows(B, K)
    rows = torch.arange(B * K).view(B, K)[examples].flatten()
    autocast = torch.autocast("cpu", dtype=torch.float16) if fp16 else contextlib.nullcontext()
    with autocast:
        losses = row_losses(loss, pm, clean[rows], sigma[rows], eps[rows], y[rows]).float()
    if weights is not None:
        losses = losses * torch.as_tensor(weights, dtype=torch.float32)[examples].repeat_interleave(K)
    total = losses.sum() / (P * K) if scaler is not None else losses.mean()
    (scaler.scale(total) if scaler is not None else total).backward()
    overflowed, norms = int(pm.collector.overflowed_examples), pm.collector.last_norms.clone()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return flat_grad(net), overflowed, norms


def test_a_scaled_loss_gives_the_fp32_update_exactly_noise_included():
    """fp32 with a loss scale of 2^12 (no autocast): the unscaled per-example gradients are clipped, so the
    update, noise included (same generator), is the unscaled run's, to fp32 rounding."""
    plain, _, norms = dp_update(noise=1.0)
    scaled, overflowed, scaled_norms = dp_update(fixed_scaler(2.0**12), noise=1.0)
    assert (norms > 0.05).all()                           # every example is clipped: the bound matters
    assert rel(scaled_norms, norms) < 1e-6                # the norms compared with C are the unscaled ones
    assert rel(scaled, plain) < 1e-6 and overflowed == 0
    unclipped, _, _ = dp_update(fixed_scaler(2.0**12), noise=1.0, C=1e6)
    assert rel(unclipped, plain) > 0.1                    # (a check that can fail: the clipping changes it)


def test_fp16_autocast_with_a_grad_scaler_matches_fp32_and_the_per_example_loop():
    fp32, _, _ = dp_update()
    fp16, overflowed, _ = dp_update(fixed_scaler(2.0**16), fp16=True)
    assert overflowed == 0
    assert rel(fp16, fp32) < 5e-3            # measured 9.5e-4
    net = mnist_net()
    loss, rows = dpdm_rows(B, K)
    reference = per_example_loop_update(net, lambda m, *r: row_losses(loss, m, *r), rows, K, 0.05, B)
    assert rel(fp16, reference) < 5e-3
    # without the scaler's unscaling, clipping at C would clip the true gradient at C / 2^16: refused
    with pytest.raises(RuntimeError, match="attach_grad_scaler"):
        dp_update(fixed_scaler(2.0**16), fp16=True, attach=False)


def test_an_overflowing_example_contributes_zero_the_step_counts_and_the_scale_does_not_back_off():
    """Example 0's loss times 1e6 overflows its fp16 gradient at a scale of 2^16; the others do not. The
    update is the two others' clipped sum (over the expected batch B), finite; the scale stays 2^16."""
    scaler = fixed_scaler(2.0**16)
    update, overflowed, norms = dp_update(scaler, fp16=True, weights=[1e6, 1.0, 1.0])
    assert overflowed == 1 and norms[0] == 0 and (norms[1:] > 0).all()
    assert torch.isfinite(update).all()
    others, _, _ = dp_update(examples=slice(1, None))     # fp32, no scaler, without example 0
    assert rel(update, others) < 5e-3      # measured 7.9e-4 (0.43 from the full batch)
    assert scaler.get_scale() == 2.0**16                   # told no overflow: no data-dependent backoff


def test_whether_an_example_overflows_does_not_depend_on_the_size_of_its_pass():
    """A pass's size follows the Poisson batch's, a function of the data. Divided by the public
    examples_per_pass, an example alone in its pass overflows exactly when it does among others; divided by
    its pass's own size (the plain mean), an example that fits among 3 overflows alone."""
    def overflows(weight, examples, per_pass):
        return dp_update(fixed_scaler(2.0**16), fp16=True, weights=[weight, 1.0, 1.0], examples=examples,
                         per_pass=per_pass)[1] > 0
    weight = 1.0
    while not overflows(weight * 2, slice(None), True):     # the largest power of 2 that still fits among 3
        weight *= 2
        assert weight < 2.0**60
    assert weight > 1                                        # (the network fits at least its own loss)
    assert not overflows(weight, slice(0, 1), True)          # alone in its pass: the same verdict
    assert overflows(weight * 2, slice(0, 1), True)
    assert overflows(weight, slice(0, 1), False)             # the plain mean over a pass of 1: 3x the scale


def linear_engine():
    """A Linear(4, 3) behind the engine, its DP optimizer (SGD, expected batch 4)."""
    net = nn.Linear(4, 3)
    pm = PrivateModule(net, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), pm.collector, noise_multiplier=1.0,
                      expected_batch_size=4)
    return net, pm, opt


def test_without_examples_per_pass_the_mean_loss_is_refused():
    _, _, opt = linear_engine()
    with pytest.raises(ValueError, match="needs examples_per_pass"):
        opt.attach_grad_scaler(fixed_scaler(2.0**10))
    assert opt.grad_scaler is None
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            opt.attach_grad_scaler(fixed_scaler(2.0**10), examples_per_pass=bad)


def test_a_scale_below_the_pass_size_is_warned_about():
    """scale / examples_per_pass < 1 scales each example's fp16 gradient down: it underflows (measured by
    bench/fp16_underflow.py); the trainer's 2^16 with passes of at most 8,192 stays clear of it."""
    _, _, opt = linear_engine()
    with pytest.warns(UserWarning, match="underflow"):
        opt.attach_grad_scaler(fixed_scaler(2.0**10), examples_per_pass=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_engine()[2].attach_grad_scaler(fixed_scaler(2.0**16), examples_per_pass=8192)


def test_the_privacy_engine_counts_an_overflowing_step():
    from dpdm_fast.engine import PrivacyEngine
    torch.manual_seed(0)
    engine, net = PrivacyEngine(), nn.Linear(4, 3)
    model, opt, loader = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 3)), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    scaler = fixed_scaler(2.0**60)          # every example's fp16 gradient overflows
    opt.attach_grad_scaler(scaler, examples_per_pass=8)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(2):
        x, y = next(iter(loader))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ((model(x).float() - y) ** 2).mean(dim=1).sum() / 8
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert engine.steps == 2                # both steps released (pure noise) and counted
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_grad_scaler_misuse_is_refused():
    net, pm, opt = linear_engine()
    with pytest.raises(TypeError, match="GradScaler"):
        opt.attach_grad_scaler(object())
    with pytest.raises(ValueError, match="depends on the data"):
        opt.attach_grad_scaler(torch.amp.GradScaler("cpu"), examples_per_pass=4)   # grows every 2000 update()s
    assert opt.grad_scaler is None
    opt.attach_grad_scaler(fixed_scaler(2.0**10), examples_per_pass=4)
    other = fixed_scaler(2.0**12)          # the loss scaled by another scaler than the attached one
    other.scale(pm(torch.randn(4, 4)).pow(2).mean()).backward()
    with pytest.raises(RuntimeError, match="unscaled by"):
        other.step(opt)
    assert pm.collector.num_examples == 0 and all(p.grad is None for p in net.parameters())
    pm(torch.randn(4, 4)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="between steps"):
        opt.attach_grad_scaler(fixed_scaler(2.0**10))
