"""What a run releases depends on the private data only through the accounted mechanism (issue 20).

Each test plays the adversary of one finding: a data hash in the checkpoint, a step released twice
after a resume, a calibration by an approximate accountant, a mechanism that depends on the realised
dataset size, a distributed data check that reads a few examples only, a bad frequency found after
the first private step.
"""
import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpdm_fast import PrivacyEngine
from dpdm_fast.checkpoint import load
from dpdm_fast.config import ConfigError, load_config
from dpdm_fast.engine.distributed.dataset_hash import dataset_fingerprint
from dpdm_fast.training import CheckpointError, Trainer, train
from dpdm_fast.training.loop import legacy_data_fingerprint
from dpdm_fast.training.privacy_plan import plan_privacy

from training_helpers import tiny_config, tiny_mnist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


def _quiet_engine(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine(**kw)


# -- 1. no unkeyed function of the data in what is shared ---------------------------------------------

def _walk(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _walk(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _walk(v)
    else:
        yield tree


def test_the_checkpoint_holds_no_hash_that_identifies_the_data(data, tmp_path):
    """Two runs on the same data: the checkpoints' data checks differ (keyed by each run's own random key),
    and no string in a checkpoint is the data's hash, so the file cannot say which candidate dataset was used."""
    cfg = tiny_config(data, **{"train.snapshot_freq": 1000})
    states = []
    for name in ("a", "b"):
        train(cfg, tmp_path / name, max_steps=1, progress=False)
        states.append(load(tmp_path / name / "checkpoint.pt"))
    trainer = Trainer(cfg, tmp_path / "probe", progress=False)
    hashes = {dataset_fingerprint(trainer.dataset), legacy_data_fingerprint(trainer.dataset)}
    for state in states:
        assert "data_fingerprint" not in state
        assert not hashes & {v for v in _walk(state) if isinstance(v, str)}
    assert states[0]["data_check"] != states[1]["data_check"]
    key = tmp_path / "a" / "private" / "data_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_resume_checks_the_data_with_the_private_key_and_needs_it(data, tmp_path):
    cfg = tiny_config(data, **{"train.snapshot_freq": 1000})
    train(cfg, tmp_path, max_steps=1, progress=False)
    Trainer(cfg, tmp_path, resume=True, progress=False)           # the same data: accepted
    os.unlink(tmp_path / "private" / "data_key")
    with pytest.raises(CheckpointError, match="private/data_key is missing"):
        Trainer(cfg, tmp_path, resume=True, progress=False)


def test_a_legacy_checkpoint_with_an_unkeyed_hash_still_resumes_and_then_drops_it(data, tmp_path):
    cfg = tiny_config(data, **{"train.snapshot_freq": 1000})
    trainer = Trainer(cfg, tmp_path, max_steps=1, progress=False)
    trainer.run()
    state = load(tmp_path / "checkpoint.pt")
    del state["data_check"]
    state["data_fingerprint"] = legacy_data_fingerprint(trainer.dataset)
    torch.save(state, tmp_path / "checkpoint.pt")
    os.unlink(tmp_path / "private" / "data_key")     # an older version's workdir has no key: one is made
    train(cfg, tmp_path, max_steps=2, resume=True, progress=False)
    assert "data_fingerprint" not in load(tmp_path / "checkpoint.pt")


def test_logs_and_console_carry_no_statistic_of_the_private_batches(data, tmp_path, capfd):
    train(tiny_config(data), tmp_path, max_steps=6, progress=True)
    out, err = capfd.readouterr()
    public = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert public and all(set(r) == {"step", "epoch", "eps", "lr"} for r in public)
    assert "loss" not in (out + err) and "ex_s" not in (out + err)
    shared = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert shared <= {"checkpoint.pt", "checkpoints", "samples", "metrics.jsonl", "private"}
    assert {p.name for p in (tmp_path / "private").iterdir()} == {"data_key", "diagnostics.jsonl", "curves.png",
                                                                   "resume_state.pt", "released_step"}


def test_nothing_in_the_checkpoint_follows_the_private_batch_sizes(tmp_path):
    """Secure mode, public size 200, datasets of 199 and 201 examples (seeded alike): the checkpoints' rng
    entries are equal. The loss's and torch's generators advance with every example, so they (and the autotune
    choices, keyed by batch sizes) are kept in private/, not in the checkpoint."""
    rngs = []
    for n in (199, 201):
        folder = tiny_mnist(tmp_path / f"data{n}", n_train=n)
        cfg = tiny_config(folder, **{"data.public_size": 200, "dp.secure_mode": "true", "train.snapshot_freq": 1000})
        train(cfg, tmp_path / f"run{n}", max_steps=2, progress=False)
        state = load(tmp_path / f"run{n}" / "checkpoint.pt")
        assert "autotune" not in state and set(state["rng"]) == {"poisson", "noise", "world_size"}
        rngs.append(state["rng"])
    assert torch.equal(rngs[0]["poisson"], rngs[1]["poisson"]) and rngs[0]["noise"] is rngs[1]["noise"] is None


# -- 2. every step released at most once ---------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True])
def test_a_checkpoint_precedes_every_released_grid_so_a_resume_never_redraws_it(data, tmp_path, secure):
    """snapshot_freq=3, save_freq=2 (the old rule checkpointed every min(3, 2) = 2 steps: the grid of step 3
    came from a step that a resume would draw again). A crash right after the grid of step 3: the resume must
    start after step 3."""
    cfg = tiny_config(data, **{"train.snapshot_freq": 3, "train.save_freq": 2, "dp.secure_mode": str(secure).lower()})
    trainer = Trainer(cfg, tmp_path, max_steps=8, progress=False)
    events, save, snapshot = [], trainer.save, trainer.snapshot

    def recording_save(wall_s, numbered=False):
        events.append(("save", trainer.step))
        return save(wall_s, numbered)

    def crashing_snapshot(name):
        events.append(("grid", trainer.step))
        snapshot(name)
        raise KeyboardInterrupt("power cut right after the grid was written")

    trainer.save, trainer.snapshot = recording_save, crashing_snapshot
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert events == [("save", 2), ("save", 3), ("grid", 3)]
    assert (tmp_path / "samples" / "step_0000003.png").exists()
    resumed = Trainer(cfg, tmp_path, resume=True, max_steps=8, progress=False)
    assert resumed.step == 3     # step 3 is not drawn again
    assert (tmp_path / "checkpoints" / "step_0000002.pt").exists()


def test_a_resume_from_an_older_checkpoint_than_a_released_step_is_refused(data, tmp_path):
    cfg = tiny_config(data, **{"train.snapshot_freq": 1000, "train.save_freq": 2})
    train(cfg, tmp_path, max_steps=4, progress=False)
    os.replace(tmp_path / "checkpoints" / "step_0000002.pt", tmp_path / "checkpoint.pt")   # "restore from a copy"
    with pytest.raises(CheckpointError, match="already released the output of step 4"):
        Trainer(cfg, tmp_path, resume=True, progress=False)


# -- 3. only upper-bound accountants calibrate ---------------------------------------------------------

def test_gdp_never_calibrates_the_noise():
    with pytest.raises(ValueError, match="not an upper bound"):
        plan_privacy(n_examples=60000, batch_size=512, n_epochs=2, epsilon=10, delta=1e-5, max_grad_norm=1,
                     accountant="gdp")
    engine = _quiet_engine(accountant="gdp")
    model = torch.nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(torch.randn(20, 3)), batch_size=5)
    with pytest.raises(ValueError, match="approximation"):
        engine.make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=loader, target_epsilon=1.0, target_delta=1e-5, epochs=1,
                                         max_grad_norm=1.0)


# -- 4. the mechanism from public numbers --------------------------------------------------------------

def _wrap(n, batch_size=16, **kw):
    model = torch.nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(torch.randn(n, 3), torch.randn(n, 1)), batch_size=batch_size)
    engine = _quiet_engine(accountant="rdp")
    _, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, **kw)
    return loader.sample_rate, len(loader), optimizer.expected_batch_size


def test_with_a_public_size_nothing_of_the_mechanism_depends_on_the_realised_size():
    assert _wrap(59, public_dataset_size=60) == _wrap(60, public_dataset_size=60) == _wrap(61, public_dataset_size=60)
    assert _wrap(61, public_dataset_size=60) == (1 / 4, 4, 15)       # q = 1/ceil(60/16), divisor 60/4


def test_without_a_public_size_the_divisor_is_still_not_the_realised_n_q():
    # Opacus divides by int(N q): 15 for N=60 and 14 for N=59 (b=16, q=1/4), revealing N through the noise's scale
    assert _wrap(60)[2] == _wrap(59)[2] == 16
    with pytest.raises(ValueError, match="public_dataset_size must be a positive int"):
        _wrap(60, public_dataset_size=0)


def test_the_trainer_with_data_public_size_plans_and_logs_alike_for_neighbouring_datasets(data, tmp_path, capfd):
    plans, logs = [], []
    for n in (199, 200, 201):
        folder = tiny_mnist(tmp_path / f"data{n}", n_train=n)
        cfg = tiny_config(folder, **{"data.public_size": 200, "train.snapshot_freq": 1000})
        trainer = Trainer(cfg, tmp_path / f"run{n}", max_steps=1, progress=False)
        plans.append((trainer.plan.as_dict(), trainer.loader.sample_rate, len(trainer.loader),
                      trainer.optimizer.expected_batch_size))
        capfd.readouterr()
        trainer.run()
        logs.append([line for line in capfd.readouterr().err.splitlines() if "wall" not in line])
    assert plans[0] == plans[1] == plans[2] and plans[0][0]["size_is_public"]
    assert logs[0] == logs[1] == logs[2] and "public (data.public_size)" in logs[0][0]
    without = Trainer(tiny_config(data, **{"train.snapshot_freq": 1000}), tmp_path / "plain", progress=False)
    assert "TREATED AS PUBLIC" in without.plan.describe()


@pytest.mark.parametrize("path, size, q", [("mnist_28/train_eps_10.0.yaml", 60000, 1 / 15),
                                           ("fmnist_28/train_eps_1.0.yaml", 60000, 1 / 15),
                                           ("celeba_32/train_eps_10.0.yaml", 162770, 1 / 80)])
def test_published_configs_fix_the_released_rate_from_the_public_size(path, size, q):
    cfg = load_config(f"configs/{path}")
    assert cfg.data.public_size == size
    plan = plan_privacy(n_examples=size, batch_size=cfg.train.batch_size, n_epochs=1, epsilon=cfg.dp.epsilon,
                        delta=cfg.dp.delta, max_grad_norm=1.0, accountant=cfg.dp.accountant, size_is_public=True)
    assert plan.sample_rate == q


# -- 5. the distributed data check reads every example -------------------------------------------------

class FileList(Dataset):
    """A dataset with no arrays to read (as one over a list of files): items come from __getitem__."""

    def __init__(self, order):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return torch.full((2,), float(self.order[i])), self.order[i] % 3


def test_the_dataset_hash_sees_one_swapped_pair_anywhere():
    base = list(range(100))
    old_sample = set(np.random.default_rng(0).choice(100, size=16, replace=False).tolist())
    i = next(k for k in range(99) if k not in old_sample and k + 1 not in old_sample)   # missed by the old check
    swapped = base.copy()
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    assert dataset_fingerprint(FileList(base)) == dataset_fingerprint(FileList(list(base)))
    assert dataset_fingerprint(FileList(base)) != dataset_fingerprint(FileList(swapped))
    assert dataset_fingerprint(FileList(base), key=b"k" * 32) != dataset_fingerprint(FileList(base))


# -- 7. every count and frequency checked before the first step ---------------------------------------

@pytest.mark.parametrize("key", ["train.snapshot_freq", "train.log_freq", "train.save_freq", "train.batch_size",
                                 "loss.n_noise_samples", "data.public_size"])
def test_a_zero_frequency_or_count_is_refused_before_any_step(data, tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key}=0"):
        Trainer(tiny_config(data, **{key: 0}), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())     # nothing read from the data, nothing written
