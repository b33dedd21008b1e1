from pathlib import Path

import pytest
import yaml

from dpdm_fast.config import ConfigError, load_config

CONFIGS = sorted(Path("configs").rglob("train_eps_*.yaml"))   # the published settings


def test_all_published_settings_present():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    for ds in ["mnist_28", "fmnist_28"]:
        for eps in ["0.2", "1.0", "10.0"]:
            assert f"{ds}/train_eps_{eps}.yaml" in names
    assert {"celeba_32/train_eps_1.0.yaml", "celeba_32/train_eps_10.0.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_matches_paper(path):
    cfg = load_config(path)
    eps = float(path.stem.split("_")[-1])
    assert cfg.dp.epsilon == eps
    assert cfg.dp.max_grad_norm == 1.0 and cfg.optim.params.lr == 3e-4 and cfg.model.ema_rate == 0.999
    assert cfg.loss.n_noise_samples == 32 and cfg.train.n_epochs == 300
    if path.parent.name == "celeba_32":
        assert cfg.train.batch_size == 2048 and cfg.dp.delta == 1e-6 and cfg.model.network.label_dim == 0
    else:
        assert cfg.train.batch_size == 4096 and cfg.dp.delta == 1e-5 and cfg.loss.n_classes == 10
    expected = "v" if eps == 0.2 else "edm"
    assert cfg.loss.version == expected and cfg.model.denoiser_name == expected


def test_quick_cpu_preset_is_a_real_private_run_of_the_mnist_pipeline():
    quick, published = load_config("configs/mnist_28/quick_cpu.yaml"), load_config("configs/mnist_28/train_eps_10.0.yaml")
    assert {k: v for k, v in quick.dp.items() if k not in ("max_physical_batch_size", "n_splits")} == \
        {k: v for k, v in published.dp.items() if k not in ("max_physical_batch_size", "n_splits")}
    assert quick.dp.epsilon == 10.0 and quick.dp.delta == 1e-5 and quick.dp.accountant == "rdp"
    assert quick.data == published.data and quick.loss.version == "edm" and quick.model.denoiser_name == "edm"
    assert quick.warmup.enabled   # DP-FETA's warm-up, composed into the same eps


def test_quick_cpu_eps_1_preset_differs_from_the_eps_10_one_only_in_eps():
    from omegaconf import OmegaConf
    quick = OmegaConf.to_container(load_config("configs/mnist_28/quick_cpu.yaml"))
    low = OmegaConf.to_container(load_config("configs/mnist_28/quick_cpu_eps_1.yaml"))
    assert low["dp"].pop("epsilon") == 1.0 and quick["dp"].pop("epsilon") == 10.0
    low["setup"].pop("workdir"), quick["setup"].pop("workdir")
    assert low == quick


def test_overrides_and_unknown_keys():
    cfg = load_config(CONFIGS[0], ["dp.epsilon=3", "loss.n_noise_samples=8"])
    assert cfg.dp.epsilon == 3 and cfg.loss.n_noise_samples == 8
    with pytest.raises(ConfigError, match="'dp.epsilo'.*Valid keys in dp: .*epsilon"):
        load_config(CONFIGS[0], ["dp.epsilo=3"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(CONFIGS[0], ["dp.epsilon"])
    with pytest.raises(ConfigError, match="bad value"):
        load_config(CONFIGS[0], ["dp.epsilon=abc"])


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="train.batch_sise.*batch_size"):
        load_config(bad)


def test_original_dpdm_config_layout_loads(tmp_path):
    """A config in the original DPDM release's layout (all its keys) loads unchanged."""
    original = {
        "setup": {"runner": "train_dpdm_base", "n_gpus_per_node": 8, "n_nodes": 1, "node_rank": 0,
                  "master_address": "127.0.0.1", "master_port": 6020, "omp_n_threads": 64},
        "data": {"path": None, "name": "mnist_28", "num_channels": 1, "resolution": 28, "n_classes": 10,
                 "fid_stats": ["assets/stats/mnist_train.npz"], "one_hot": False,
                 "dataloader_params": {"num_workers": 1}},
        "model": {"denoiser_name": "edm", "denoiser_network": "song", "ema_rate": 0.999,
                  "network": {"image_size": 28, "attn_resolutions": [7]}},
        "optim": {"optimizer": "Adam", "params": {"lr": 3e-4, "weight_decay": 0.0}},
        "sampler": {"type": "ddim", "stochastic": False, "num_steps": 50, "tmin": 0.002, "tmax": 80.0,
                    "rho": 7.0, "guid_scale": 0.0, "snapshot_batch_size": 64, "fid_batch_size": 64},
        "train": {"seed": 0, "batch_size": 4096, "n_epochs": 300, "log_freq": 100, "snapshot_freq": 1000,
                  "snapshot_threshold": 1, "save_freq": 100000, "save_threshold": 1, "fid_freq": 10000,
                  "fid_samples": 5000, "fid_threshold": 1},
        "loss": {"version": "edm", "p_mean": -1.2, "p_std": 1.2, "n_noise_samples": 32, "n_classes": 10},
        "dp": {"max_grad_norm": 1.0, "delta": 1e-5, "epsilon": 10.0, "max_physical_batch_size": 8192,
               "n_splits": 4},
    }
    path = tmp_path / "dpdm.yaml"
    path.write_text(yaml.safe_dump(original))
    cfg = load_config(path)
    assert cfg.setup.n_gpus_per_node == 8 and cfg.dp.n_splits == 4 and cfg.data.fid_stats == original["data"]["fid_stats"]


def test_cli_info(capsys):
    from dpdm_fast.cli import main
    assert main(["info", "configs/mnist_28/train_eps_10.0.yaml"]) == 0
    out = capsys.readouterr().out
    # q = 1/15 (15 batches of 4096 per epoch, the rate the Poisson loader uses, as Opacus's make_private_with_epsilon),
    # not 4096/60000 (which would give 2.515)
    assert "1,753,345 parameters" in out and "q=1/15" in out and "sigma=2.4878" in out
    assert main(["info", "configs/mnist_28/train_eps_10.0.yaml", "dp.nope=1"]) == 2
    assert "Valid keys in dp" in capsys.readouterr().err
