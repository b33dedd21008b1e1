"""`dpdm-fast sample`: the .npz other evaluators read, seeds, labels, and DPDM-release checkpoints."""
import numpy as np
import pytest
import torch
from PIL import Image

from dpdm_fast.cli import main
from dpdm_fast.config import load_config
from dpdm_fast.generate import build_model, generate, load_for_sampling, sample_labels
from dpdm_fast.training import CheckpointError, train

from training_helpers import CONFIG, tiny_config, tiny_mnist, tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tiny_mnist(tmp_path_factory.mktemp("mnist"))
    workdir = tmp_path_factory.mktemp("run")
    train(tiny_config(data), workdir, max_steps=3, progress=False)
    return data, workdir / "checkpoint.pt"


def _sample(ckpt, out, *extra):
    assert main(["sample", str(ckpt), "--n", "12", "--steps", "3", "--batch", "5", "--out", str(out),
                 "--no-progress", *extra]) == 0
    with np.load(out) as f:
        return f["images"], f["labels"]


def test_sample_writes_uint8_images_int64_labels_and_a_grid(run, tmp_path):
    _, ckpt = run
    images, labels = _sample(ckpt, tmp_path / "s.npz")
    assert images.dtype == np.uint8 and images.shape == (12, 28, 28, 1)
    assert labels.dtype == np.int64 and labels.tolist() == sample_labels(12, "random", 10, seed=0).tolist()
    assert images.std() > 0
    assert Image.open(tmp_path / "s.png").size[0] > 28
    with np.load(tmp_path / "s.npz") as f:                  # how they were made, for `dpdm-fast eval`'s report
        assert (str(f["label_mode"]), str(f["quantize"])) == ("random", "truncate")
    _, balanced = _sample(ckpt, tmp_path / "b.npz", "--labels", "balanced", "--quantize", "round")
    assert balanced.tolist() == [i % 10 for i in range(12)]
    with np.load(tmp_path / "b.npz") as f:
        assert (str(f["label_mode"]), str(f["quantize"])) == ("balanced", "round")


def test_same_seed_same_file_other_seed_other_images(run, tmp_path):
    _, ckpt = run
    a, _ = _sample(ckpt, tmp_path / "a.npz", "--seed", "7")
    b, _ = _sample(ckpt, tmp_path / "b.npz", "--seed", "7")
    c, _ = _sample(ckpt, tmp_path / "c.npz", "--seed", "8")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_labels_sampler_and_guidance_options(run, tmp_path):
    _, ckpt = run
    _, labels = _sample(ckpt, tmp_path / "k.npz", "--labels", "3")
    assert set(labels.tolist()) == {3}
    plain, _ = _sample(ckpt, tmp_path / "p.npz", "--sampler", "edm")
    guided, _ = _sample(ckpt, tmp_path / "g.npz", "--sampler", "edm", "--guidance", "2")
    assert not np.array_equal(plain, guided)
    churn, _ = _sample(ckpt, tmp_path / "ch.npz", "--sampler", "edm", "sampler.s_churn=5")
    assert not np.array_equal(plain, churn)
    with pytest.raises(ValueError, match="classes are 0..9"):
        sample_labels(4, "10", 10)
    assert main(["sample", str(ckpt), "--n", "2", "--labels", "12", "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / "x.png")]) == 2


def test_ema_weights_by_default_raw_weights_on_request(run):
    _, ckpt = run
    ema_model, cfg = load_for_sampling(ckpt)
    raw_model, _ = load_for_sampling(ckpt, use_ema=False)
    state = torch.load(ckpt)
    name = "all_modules.3.weight"
    assert torch.equal(ema_model.model.state_dict()[name], state["ema"][name])
    assert torch.equal(raw_model.model.state_dict()[name], state["model"][name])


def test_a_checkpoint_of_the_original_dpdm_release_samples_the_same(run, tmp_path):
    """DPDM saved {'model': DDP(denoiser).state_dict(), 'ema': score_sde EMA state, 'optimizer', 'step'}."""
    data, ckpt = run
    ours = torch.load(ckpt)
    model, cfg = load_for_sampling(ckpt)
    ema_params = [ours["ema"][name] for name, _ in model.model.named_parameters()]
    release = {"model": {f"module.model.{k}": v for k, v in ours["model"].items()},
               "ema": {"decay": 0.999, "num_updates": 3, "shadow_params": ema_params},
               "optimizer": {}, "step": 3}
    torch.save(release, tmp_path / "dpdm_release.pth")
    with pytest.raises(CheckpointError, match="pass --config"):
        load_for_sampling(tmp_path / "dpdm_release.pth")
    config_file = tmp_path / "config.yaml"
    from omegaconf import OmegaConf
    OmegaConf.save(cfg, config_file)
    theirs, _ = load_for_sampling(tmp_path / "dpdm_release.pth", config=config_file)
    labels = sample_labels(6, "all", 10)
    a = generate(model, cfg, 6, labels, seed=1, batch_size=6, sampler_options=dict(type="ddim", num_steps=3), progress=False)
    b = generate(theirs, cfg, 6, labels, seed=1, batch_size=6, sampler_options=dict(type="ddim", num_steps=3), progress=False)
    assert np.array_equal(a, b)
    raw, _ = load_for_sampling(tmp_path / "dpdm_release.pth", config=config_file, use_ema=False)
    assert torch.equal(raw.model.state_dict()["all_modules.3.weight"], ours["model"]["all_modules.3.weight"])


def test_a_checkpoint_of_another_network_is_a_clear_error(run, tmp_path):
    data, ckpt = run
    other = tmp_path / "other.yaml"
    from omegaconf import OmegaConf
    OmegaConf.save(load_config(CONFIG, tiny_overrides(data, **{"model.network.nf": 16})), other)
    with pytest.raises(CheckpointError, match="do not fit this network"):
        load_for_sampling(ckpt, config=other)
    state = torch.load(ckpt)
    release = {"ema": {"shadow_params": list(state["ema"].values())[:-1]}}
    torch.save(release, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="checkpoint of another network"):
        load_for_sampling(tmp_path / "short.pth", config=other)


def test_unconditional_models_store_minus_one_labels(tmp_path):
    cfg = load_config(CONFIG, ["model.network.nf=8", "model.network.ch_mult=[1,2]", "model.network.num_res_blocks=1",
                               "model.network.attn_resolutions=[]", "model.network.label_dim=0", "data.n_classes=null"])
    model = build_model(cfg).eval()
    assert sample_labels(5, "all", cfg.data.n_classes) is None
    with pytest.raises(ValueError, match="unconditional"):
        sample_labels(5, "3", None)
    images = generate(model, cfg, 5, None, batch_size=5, sampler_options=dict(type="ddim", num_steps=2), progress=False)
    from dpdm_fast.generate import write_samples
    write_samples(images, None, tmp_path / "u.npz")
    with np.load(tmp_path / "u.npz") as f:
        assert f["labels"].tolist() == [-1] * 5


def test_labels_are_uniform_random_by_default_as_released_and_balanced_on_request():
    from dpdm_fast.generate import label_mode
    random = sample_labels(1000, None, 10, seed=3)
    assert torch.equal(random, sample_labels(1000, "random", 10, seed=3))          # reproducible from the seed
    assert not torch.equal(random, sample_labels(1000, "random", 10, seed=4))
    counts = random.bincount(minlength=10)
    assert counts.min() > 50 and counts.max() < 150 and len(set(counts.tolist())) > 1   # not balanced
    assert sample_labels(20, "balanced", 10).bincount().tolist() == [2] * 10
    assert torch.equal(sample_labels(20, "all", 10), sample_labels(20, "balanced", 10))  # the older name
    assert label_mode(None, 10) == "random" and label_mode("all", 10) == "balanced" and label_mode("3", 10) == "class 3"
    with pytest.raises(ValueError, match="'random', 'balanced'"):
        sample_labels(5, "uniform", 10)


def test_samples_are_quantised_by_truncation_as_released_and_rounded_on_request():
    from dpdm_fast.imaging import to_uint8
    x = torch.tensor([-1.0, 0.0, 0.999, 1.0, 1.5, -2.0]).view(1, 1, 1, 6)
    assert to_uint8(x).ravel().tolist() == [0, 127, 254, 255, 255, 0]            # (x/2+.5).clip(0,1)*255 -> uint8
    assert to_uint8(x, "round").ravel().tolist() == [0, 128, 255, 255, 255, 0]
    with pytest.raises(ValueError, match="quantize"):
        to_uint8(x, "floor")
