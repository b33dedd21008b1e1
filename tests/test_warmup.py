"""The DP warm-up (DP-FETA's central images, FETA-Pro's RFF release): its mechanisms, its place in the
privacy ledger, and its stages inside a training run (resume, re-release, starting weights)."""
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from dpdm_fast.checkpoint import CheckpointError, load
from dpdm_fast.engine.api.accounting import Accounting
from dpdm_fast.training import train
from dpdm_fast.training.privacy_plan import composed_epsilon, plan_privacy, quiet_accountant
from dpdm_fast.training.warm_start import planned_releases
from dpdm_fast.warmup import Release, central_images, rff
from dpdm_fast.warmup.augment import Augment

from training_helpers import tiny_config, tiny_mnist

CENTRAL = Release("central_images", 5.0, 0.1, 5)
RFF = Release("rff_embedding", 20.0, 1.0, 1)


# -- the ledger --------------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_composed_epsilon_is_the_accountants_on_the_same_history(accountant):
    plan = plan_privacy(n_examples=60000, batch_size=512, n_epochs=2, epsilon=3.0, delta=1e-5, max_grad_norm=1.0,
                        accountant=accountant, size_is_public=True, releases=(CENTRAL, RFF))
    acc = create_accountant(mechanism=accountant)
    acc.history = [CENTRAL.entry, RFF.entry, (plan.noise_multiplier, plan.sample_rate, 100)]
    with quiet_accountant():
        expected = acc.get_epsilon(delta=1e-5)
    assert plan.epsilon_after(100) == pytest.approx(expected, rel=1e-9)
    # the total never exceeds the target, and the releases are not free: sigma is above the plan without them
    assert plan.epsilon_after(plan.budget_steps) <= 3.0
    alone = plan_privacy(n_examples=60000, batch_size=512, n_epochs=2, epsilon=3.0, delta=1e-5, max_grad_norm=1.0,
                         accountant=accountant, size_is_public=True)
    assert plan.noise_multiplier > alone.noise_multiplier
    split = plan.split()
    assert set(split) == {"central_images", "rff_embedding", "dp_sgd", "total"}
    assert split["total"] > max(split["central_images"], split["rff_embedding"], split["dp_sgd"])
    assert "central_images" in plan.describe_split() and "rff_embedding" in plan.describe_split()


def test_the_cached_rdp_composition_is_opacus_to_the_last_bit():
    """composed_epsilon caches each entry's RDP curve (the calibration re-composes the same releases many
    times): it must equal a fresh Opacus RDPAccountant exactly, in any order and after the cache is warm."""
    histories = [[CENTRAL.entry, RFF.entry, (1.3, 1 / 15, 4500)], [(1.3, 1 / 15, 4500)],
                 [RFF.entry, (0.9, 0.01, 7), CENTRAL.entry], [(20.0, 0.5, 2), (2.0, 1 / 80, 24000)]]
    for history in histories + histories:
        acc = create_accountant(mechanism="rdp")
        acc.history = list(history)
        with quiet_accountant():
            assert composed_epsilon("rdp", history, 1e-5) == acc.get_epsilon(delta=1e-5)


def test_releases_that_spend_the_budget_are_refused():
    with pytest.raises(ValueError, match="releases before DP-SGD alone"):
        plan_privacy(n_examples=60000, batch_size=512, n_epochs=1, epsilon=0.05, delta=1e-5, max_grad_norm=1.0,
                     accountant="rdp", size_is_public=True, releases=(Release("loud", 0.5, 1.0, 3),))


def test_ledger_counts_releases_in_epsilon_but_not_in_steps():
    acc = Accounting("rdp")
    acc.secure_mode = False
    acc.compose_releases([CENTRAL.entry])
    assert acc.steps == 0
    assert acc.get_epsilon(1e-5) == pytest.approx(composed_epsilon("rdp", [CENTRAL.entry], 1e-5))
    acc.accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.steps == 1
    restored = Accounting("rdp")
    restored.load_state_dict(acc.state_dict())
    assert restored.steps == 1 and restored.prior == [CENTRAL.entry]
    with pytest.raises(RuntimeError, match="releases come first"):
        acc.compose_releases([RFF.entry])


def test_a_step_with_the_releases_noise_and_rate_is_still_counted_as_a_step():
    # Opacus merges a step into the last ledger entry when (sigma, q) are equal
    acc = Accounting("rdp")
    acc.compose_releases([(1.0, 0.5, 3)])
    acc.accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    assert acc.steps == 1


# -- stage 1: central images ---------------------------------------------------------------------------
def _constant_set(n_per_class, n_classes=2, value=255):
    images = torch.full((n_per_class * n_classes, 1, 8, 8), value, dtype=torch.uint8)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return images, labels


def test_central_images_noise_has_the_stated_std():
    images, labels = _constant_set(50)
    sigma, size, public = 3.0, 4, 100
    means, out_labels = central_images.noisy_class_means(
        images, labels, n_groups=2, rounds=400, sample_rate=1.0, noise_multiplier=sigma, size=size,
        public_size=public, generator=torch.Generator().manual_seed(0))
    divisor = central_images.expected_class_count(public, 1.0, 2)          # 50: public, not the realised count
    bound = central_images.sensitivity(1, size)                              # sqrt(16) = 4
    noise = means - 50 / divisor                                             # every pixel is 1, 50 per class
    expected_std = sigma * bound / divisor
    assert noise.mean().abs() < 0.02 * expected_std * 10
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)       # 12,800 draws: 1% standard error
    assert out_labels.tolist()[:4] == [0, 1, 0, 1]


def test_central_images_divide_by_the_public_expected_count_not_the_realised_one():
    # with almost no noise, the release is sum / (N_public q / classes): 3 examples per class over a public
    # expectation of 5 gives 0.6, whatever the realised count
    images, labels = _constant_set(3)
    means, _ = central_images.noisy_class_means(images, labels, n_groups=2, rounds=1, sample_rate=1.0,
                                                noise_multiplier=1e-9, size=8, public_size=10,
                                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(means, torch.full_like(means, 0.6), atol=1e-6)


def test_downsampled_images_stay_within_the_sensitivity_bound():
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8).float() / 255
    small = central_images.downsample(x, 14)
    assert small.min() >= 0 and small.max() <= 1
    assert small.flatten(1).norm(dim=1).max() <= central_images.sensitivity(1, 14) + 1e-6
    with pytest.raises(ValueError, match="leaves no pixel"):
        central_images.downsampled_size(28, 0.01)


def test_postprocessing_clamps_upsamples_and_blurs():
    means = torch.randn(4, 1, 14, 14) * 2
    out = central_images.postprocess(means, 28, median_blur=3, sharpen=1.5)
    assert out.shape == (4, 1, 28, 28) and out.min() >= 0 and out.max() <= 1


# -- stage 1b: RFF ---------------------------------------------------------------------------------------
def test_rff_embedding_has_unit_norm_so_its_sensitivity_is_one():
    w = rff.frequencies(784, 200, 5.0, seed=0)
    x = torch.rand(32, 784)
    phi = rff.features(x, w)
    assert torch.allclose(phi.norm(dim=1), torch.ones(32), atol=1e-5)
    images = (torch.rand(40, 1, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(40) % 4
    without_noise = rff.noisy_class_embedding(images, labels, 4, w, 1e-12, torch.Generator().manual_seed(0))
    one_less = rff.noisy_class_embedding(images[1:], labels[1:], 4, w, 1e-12, torch.Generator().manual_seed(0))
    assert (without_noise - one_less).norm().item() == pytest.approx(1.0, abs=1e-4)   # add/remove: one unit row
    means, counts = rff.class_means(without_noise)
    assert counts.tolist() == pytest.approx([10.0] * 4, abs=1e-3)


def test_rff_release_noise_has_the_stated_std():
    w = rff.frequencies(64, 1000, 2.0, seed=0)
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    clean = rff.noisy_class_embedding(images, None, 1, w, 1e-12, torch.Generator().manual_seed(0))
    noisy = rff.noisy_class_embedding(images, None, 1, w, 4.0, torch.Generator().manual_seed(1))
    assert (noisy - clean).std().item() == pytest.approx(4.0, rel=0.06)   # 1,001 draws


def test_rff_generator_moves_towards_the_released_embedding():
    w = rff.frequencies(64, 400, 2.0, seed=0)
    images = torch.zeros(60, 1, 8, 8, dtype=torch.uint8)
    images[:30, :, 2:6, 2:6] = 255                    # class 0: a bright square; class 1: empty
    labels = torch.tensor([0] * 30 + [1] * 30)
    released = rff.noisy_class_embedding(images, labels, 2, w, 1e-6, torch.Generator().manual_seed(0))
    gen = rff.train_generator(released, w, channels=1, resolution=8, steps=150, batch_size=64, lr=3e-3, seed=0)
    fake, fake_labels = rff.generate_images(gen, released, 200, seed=0)
    assert fake.shape == (200, 1, 8, 8) and 0 <= fake.min() and fake.max() <= 1
    bright = fake[fake_labels == 0][:, :, 2:6, 2:6].mean()
    dark = fake[fake_labels == 1][:, :, 2:6, 2:6].mean()
    assert bright > dark + 0.3


# -- augmentation ----------------------------------------------------------------------------------------
def test_augmentation_changes_images_and_keeps_them_in_range():
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1
    y = Augment(2, 10)(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().sum() > 0
    assert Augment(0, 10)(x) is x
    with pytest.raises(ValueError, match="augment_magnitude"):
        Augment(2, 30)
    from dpdm_fast.warmup.augment import POLICY
    assert not any(op[0][0] in ("invert", "solarize", "solarize_add") for op in POLICY)


# -- in a training run -------------------------------------------------------------------------------------
def _warm_config(tmp_path, **extra):
    values = {"warmup.enabled": "true", "warmup.central.sample_rate": 0.5, "warmup.central.rounds": 2,
              "warmup.central.noise_multiplier": 20.0, "warmup.train.central_steps": 3,
              "warmup.train.batch_size": 8}
    values.update(extra)
    return tiny_config(tiny_mnist(tmp_path / "mnist"), **values)


def test_training_with_warmup_composes_every_stage_and_resumes_without_releasing_again(tmp_path):
    cfg = _warm_config(tmp_path, **{"warmup.rff.enabled": "true", "warmup.rff.n_features": 64,
                                    "warmup.rff.generator_steps": 2, "warmup.rff.generator_batch_size": 20,
                                    "warmup.rff.n_images": 30, "warmup.rff.noise_multiplier": 20.0,
                                    "warmup.train.generated_steps": 2})
    work = tmp_path / "run"
    first = train(cfg, work, max_steps=3, progress=False)
    warm = work / "warmup"
    released = {name: (warm / name).read_bytes() for name in ("central_images.npz", "rff_embedding.npz",
                                                               "generated_images.npz", "warm_generated.pt")}
    assert (warm / "central_images.png").exists() and (warm / "generated_images.png").exists()
    state = load(work / "checkpoint.pt")
    releases = planned_releases(cfg)
    assert [r.name for r in releases] == ["central_images", "rff_embedding"]
    assert state["privacy"]["engine"]["prior_releases"] == [r.entry for r in releases]
    plan = state["privacy"]["plan"]
    history = [r.entry for r in releases] + [(plan["noise_multiplier"], plan["sample_rate"], 3)]
    assert state["privacy"]["epsilon"] == pytest.approx(composed_epsilon("rdp", history, 1e-3), rel=1e-9)
    assert first.epsilon == pytest.approx(state["privacy"]["epsilon"], rel=1e-9)
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    first_step = next(r for r in logged if r["step"] == 1)
    assert first_step["eps"] == pytest.approx(composed_epsilon("rdp", history[:2] + [history[2][:2] + (1,)], 1e-3))
    result = train(cfg, work, resume=True, progress=False)
    assert result.finished and result.epsilon <= cfg.dp.epsilon
    for name, content in released.items():
        assert (warm / name).read_bytes() == content, f"{name} was drawn again on resume"


def test_dp_sgd_starts_from_the_warm_weights(tmp_path):
    cfg = _warm_config(tmp_path)
    work = tmp_path / "run"
    train(cfg, work, max_steps=1, progress=False)
    warm = torch.load(work / "warmup" / "warm_central.pt", weights_only=True)["ema"]
    cold = tmp_path / "cold"
    train(tiny_config(tiny_mnist(tmp_path / "mnist")), cold, max_steps=1, progress=False)
    # the EMA after one DP-SGD step is still within a step of its start: near the warm weights, not the cold
    ema_warm, ema_cold = load(work / "checkpoint.pt")["ema"], load(cold / "checkpoint.pt")["ema"]
    name = next(k for k, v in warm.items() if v.dtype.is_floating_point and v.numel() > 100 and v.abs().sum() > 0)
    assert (ema_warm[name] - warm[name]).norm() < (ema_cold[name] - warm[name]).norm()


def test_a_crash_after_the_release_resumes_the_warmup_and_never_starts_over(tmp_path):
    cfg = _warm_config(tmp_path)
    work = tmp_path / "run"
    train(cfg, work, max_steps=1, progress=False)
    central = (work / "warmup" / "central_images.npz").read_bytes()
    (work / "checkpoint.pt").unlink()                    # as if it crashed before the first DP-SGD step
    (work / "warmup" / "warm_central.pt").unlink()       # ... and during the warm-up training
    with pytest.raises(CheckpointError, match="warm-up releases of a run"):
        train(cfg, work, max_steps=1, progress=False)
    train(cfg, work, resume=True, max_steps=1, progress=False)
    assert (work / "warmup" / "central_images.npz").read_bytes() == central
    assert (work / "warmup" / "warm_central.pt").exists()
    other = _warm_config(tmp_path, **{"warmup.central.noise_multiplier": 10.0})
    (work / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="other settings"):
        train(other, work, resume=True, max_steps=1, progress=False)
    other_data = _warm_config(tmp_path, **{"data.path": str(tiny_mnist(tmp_path / "mnist_190", n_train=190))})
    with pytest.raises(CheckpointError, match="not the data whose statistics"):
        train(other_data, work, resume=True, max_steps=1, progress=False)


def test_warmup_settings_are_checked_before_anything_runs(tmp_path):
    from dpdm_fast.config import ConfigError, load_config, validate_counts
    for bad in ("warmup.central.sample_rate=0", "warmup.central.median_blur=2", "warmup.rff.n_features=7",
                "warmup.central.noise_multiplier=-1", "warmup.train.augment_magnitude=31"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            validate_counts(load_config(None, [bad]))
    assert not load_config(None).warmup.enabled       # off unless a config asks for it
    assert math.isclose(load_config(None).warmup.central.noise_multiplier, 5.0)


def test_published_configs_stay_as_released_and_the_feta_configs_plan_their_releases():
    from pathlib import Path
    from dpdm_fast.config import load_config, validate_counts
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(configs.glob("*/train_eps_*.yaml")):
        assert not load_config(path).warmup.enabled, path
    feta = sorted(configs.glob("*/dp_feta_eps_*.yaml")) + sorted(configs.glob("*/feta_pro_eps_*.yaml"))
    assert len(feta) == 8
    for path in feta:
        cfg = load_config(path)
        validate_counts(cfg)
        names = [r.name for r in planned_releases(cfg)]
        assert names == (["central_images", "rff_embedding"] if "feta_pro" in path.name else ["central_images"]), path
