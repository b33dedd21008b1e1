"""The training loop: outputs, exact resume, budget, and every way a run can be refused or broken."""
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from dpdm_fast.config import load_config
from dpdm_fast.engine import autotune
from dpdm_fast.training import CheckpointError, Trainer, train
from dpdm_fast.training import privacy_plan
from dpdm_fast.checkpoint import load, save_atomic
from dpdm_fast.training.privacy_plan import epsilon_after, plan_privacy

from training_helpers import CONFIG, tiny_config, tiny_mnist, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """One whole tiny run (14 steps), shared by the tests that only read its outputs."""
    workdir = tmp_path_factory.mktemp("run")
    result = train(tiny_config(data), workdir, progress=False)
    return workdir, result


def test_a_run_writes_checkpoint_metrics_samples_and_curves(finished_run):
    workdir, result = finished_run
    assert result.finished and result.step == 14 and result.interrupted is None
    state = torch.load(workdir / "checkpoint.pt")            # plain torch.load, weights_only by default
    assert state["step"] == 14 and state["version"] and state["config"]["loss"]["n_noise_samples"] == 2
    assert {"model", "ema", "optimizer", "privacy", "rng", "data_check"} <= set(state)
    assert 0 < state["privacy"]["epsilon"] <= 10.0 and state["privacy"]["epsilon"] == pytest.approx(result.epsilon)
    assert state["privacy"]["epsilon"] == pytest.approx(epsilon_after("rdp", state["privacy"]["plan"]["noise_multiplier"],
                                                                      1 / 7, 14, 1e-3))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 4, 6, 8, 10, 12, 14]
    assert all(set(r) == {"step", "epoch", "eps", "lr"} for r in lines)    # nothing computed from the data
    assert [r["eps"] for r in lines] == sorted(r["eps"] for r in lines) and lines[-1]["eps"] <= 10
    private = [json.loads(line) for line in (workdir / "private" / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in private] == [1, 2, 4, 6, 8, 10, 12, 14]
    assert all(r["loss"] > 0 and 0 <= r["frac_clipped"] <= 1 and r["grad_norm_mean"] > 0 for r in private)
    grid = Image.open(workdir / "samples" / "final.png")
    assert grid.size == (2 * (10 * 30 + 2), 2 * (10 * 30 + 2))     # 10 classes x 10 samples, 28 px + 2 px gaps, x2
    assert (workdir / "samples" / "step_0000006.png").exists() and (workdir / "private" / "curves.png").exists()
    assert not torch.equal(state["ema"]["all_modules.3.weight"], state["model"]["all_modules.3.weight"])


def _same_run(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["privacy"]["epsilon"] == b["privacy"]["epsilon"] and a["step"] == b["step"]


def test_interrupted_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(data, tmp_path):
    cfg = tiny_config(data, **{"dp.autotune": "false"})
    autotune.clear_cache()
    train(cfg, tmp_path / "whole", progress=False)
    autotune.clear_cache()
    first = train(cfg, tmp_path / "sliced", max_steps=5, progress=False)
    assert first.step == 5 and not first.finished
    autotune.clear_cache()
    train(cfg, tmp_path / "sliced", max_steps=9, resume=True, progress=False)
    train(cfg, tmp_path / "sliced", resume=True, progress=False)
    whole, sliced = load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "sliced" / "checkpoint.pt")
    _same_run(whole, sliced)
    # the log of the sliced run has the same lines (plus one at each slice's end), with the same epsilons
    read = lambda p: {r["step"]: r["eps"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    whole_log, sliced_log = read(tmp_path / "whole"), read(tmp_path / "sliced")
    assert set(sliced_log) == set(whole_log) | {5, 9}
    assert all(sliced_log[s] == eps for s, eps in whole_log.items())


def test_resume_restores_the_autotune_choices(data, tmp_path):
    cfg = tiny_config(data)
    autotune.clear_cache()
    train(cfg, tmp_path, max_steps=2, progress=False)
    assert "autotune" not in load(tmp_path / "checkpoint.pt")   # timed on private batch sizes: kept in private/
    saved = load(tmp_path / "private" / "resume_state.pt")["autotune"]
    assert saved
    autotune.clear_cache()
    Trainer(cfg, tmp_path, resume=True, progress=False)
    assert autotune.state_dict() == saved


def test_the_resume_state_holds_the_dropout_generators_and_a_resume_restores_them(data, tmp_path, monkeypatch):
    """(On a GPU, dropout draws from the device's generator: saved beside the CPU's; test_gpu.py checks
    that its draws continue.)"""
    from dpdm_fast.training import loop
    train(tiny_config(data), tmp_path, max_steps=1, progress=False)
    stream = load(tmp_path / "private" / "resume_state.pt")["streams"][0]
    assert stream["torch"].dtype == torch.uint8 and stream["cuda"] is None   # a CPU run: no GPU generator
    restored = []
    monkeypatch.setattr(loop, "restore_dropout_rng", lambda state, device: restored.append((state, device)))
    Trainer(tiny_config(data), tmp_path, resume=True, progress=False)
    assert len(restored) == 1 and torch.equal(restored[0][0]["torch"], stream["torch"])


def test_the_run_stops_where_the_budget_ends_even_inside_the_schedule(data, tmp_path, monkeypatch):
    # A search that overshoots (sigma a little too small for the whole schedule): the plan keeps only
    # the steps within the target, and the run stops there.
    real = privacy_plan.get_noise_multiplier
    monkeypatch.setattr(privacy_plan, "get_noise_multiplier", lambda **kw: real(**kw) * 0.97)
    cfg = tiny_config(data)
    plan = plan_privacy(n_examples=200, batch_size=32, n_epochs=2, epsilon=10.0, delta=1e-3, max_grad_norm=1.0,
                        accountant="rdp")
    assert plan.budget_steps < plan.total_steps
    assert plan.epsilon_after(plan.budget_steps) <= 10 < plan.epsilon_after(plan.budget_steps + 1)
    result = train(cfg, tmp_path, progress=False)
    assert result.step == plan.budget_steps and result.finished and result.epsilon <= 10.0
    with pytest.raises(CheckpointError, match="the run is complete"):
        Trainer(cfg, tmp_path, resume=True, progress=False)


def test_a_finished_run_is_not_resumed_and_a_workdir_is_not_reused(finished_run, data):
    workdir, _ = finished_run
    with pytest.raises(CheckpointError, match="the run is complete"):
        Trainer(tiny_config(data), workdir, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="already holds this run, at step 14.*--resume"):
        Trainer(tiny_config(data), workdir, progress=False)
    with pytest.raises(CheckpointError, match="already holds a different run.*loss.n_noise_samples"):
        Trainer(tiny_config(data, **{"loss.n_noise_samples": 4}), workdir, progress=False)


def test_resuming_with_another_config_is_refused_and_names_the_keys(data, tmp_path):
    train(tiny_config(data), tmp_path, max_steps=2, progress=False)
    with pytest.raises(CheckpointError, match=r"(?s)different run.*model.network.nf: 8 in the checkpoint, 16 now"):
        Trainer(tiny_config(data, **{"model.network.nf": 16}), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="dp.epsilon"):
        Trainer(tiny_config(data, **{"dp.epsilon": 5.0}), tmp_path, resume=True, progress=False)
    # where things go and how often may change; physical batching may not (the loss draws per physical batch)
    Trainer(tiny_config(data, **{"train.log_freq": 1}), tmp_path, resume=True, progress=False)
    for key, value in (("dp.max_physical_batch_size", 5), ("dp.n_splits", 2)):
        with pytest.raises(CheckpointError, match=key):
            Trainer(tiny_config(data, **{key: value}), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="already at step 2"):
        Trainer(tiny_config(data), tmp_path, resume=True, max_steps=2, progress=False)
    with pytest.raises(ValueError, match="the schedule has 14 steps"):
        Trainer(tiny_config(data), tmp_path / "new", max_steps=15, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(tiny_config(data), tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("override, match", [
    ({"dp.epsilon": 0.0}, "dp.epsilon must be a finite number > 0"),
    ({"dp.delta": 0.005}, r"dp.delta must be in \(0, 1/N\)"),
    ({"dp.epsilon": 1e-4}, "no noise multiplier reaches eps=0.0001"),
    ({"dp.accountant": "moments"}, "rdp or prv"),
    ({"dp.accountant": "gdp"}, "not an upper bound"),
])
def test_impossible_privacy_targets_are_clear_errors(data, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_config(data, **override), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_data_says_which_files_to_put_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    cfg = load_config(CONFIG, tiny_overrides(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        Trainer(cfg, tmp_path / "run", progress=False)
    cache = os.environ["DPDM_FAST_CACHE"]
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "nowhere" in str(e.value)
    assert f"copy them to {cache}/MNIST" in str(e.value)   # a missing folder is not created; the cache is named
    assert not (tmp_path / "nowhere").exists()


def test_unwritable_workdir_is_refused_before_training(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        Trainer(tiny_config(data), blocker / "run", progress=False)


def test_corrupt_or_truncated_checkpoints_are_clear_errors(data, tmp_path, finished_run):
    workdir, _ = finished_run
    good = (workdir / "checkpoint.pt").read_bytes()
    for broken in (b"not a checkpoint at all", good[: len(good) // 2]):
        (tmp_path / "checkpoint.pt").write_bytes(broken)
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            Trainer(tiny_config(data), tmp_path, resume=True, progress=False)
    torch.save({"step": 3, "model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a dpdm_fast training checkpoint"):
        Trainer(tiny_config(data), tmp_path, resume=True, progress=False)


def test_a_full_disk_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    train(tiny_config(data), tmp_path, max_steps=2, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint .* is unchanged"):
        train(tiny_config(data), tmp_path, max_steps=4, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")] == []
    assert load(tmp_path / "checkpoint.pt")["step"] == 2


def test_save_atomic_replaces_whole_files_only(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert load(path)["step"] == 2 and list(tmp_path.iterdir()) == [path]


def test_empty_poisson_batches_are_trained_through(data, tmp_path):
    # batch_size 2 of 200: q = 1/100, so about 13% of the batches are empty; each is still a noised step.
    cfg = tiny_config(data, **{"train.batch_size": 2, "train.n_epochs": 1, "train.snapshot_freq": 1000,
                               "train.log_freq": 1})
    trainer = Trainer(cfg, tmp_path, max_steps=30, progress=False)
    result = trainer.run()
    assert result.step == 30 and trainer.engine.steps == 30
    rows = [json.loads(x) for x in (tmp_path / "private" / "diagnostics.jsonl").read_text().splitlines()]
    assert any(np.isnan(r["loss"]) for r in rows) and len(rows) == 30   # empty steps: no loss, still logged


def test_physical_batches_make_one_step_per_logical_batch(finished_run):
    workdir, result = finished_run
    state = load(workdir / "checkpoint.pt")
    (history,) = state["privacy"]["engine"]["accountant"]["history"]
    assert history[2] == 14 and history[1] == pytest.approx(1 / 7)   # 14 steps at q = 1/7, physical batches of 12


def test_bf16_autocast_and_secure_mode_runs_train_and_resume(data, tmp_path):
    cfg = tiny_config(data, **{"dp.secure_mode": "true", "train.snapshot_freq": 1000})
    first = train(cfg, tmp_path, max_steps=2, amp=True, progress=False)
    assert first.step == 2
    state = load(tmp_path / "checkpoint.pt")
    assert state["rng"]["noise"] is None          # secure mode: no seeded noise stream to save
    result = train(cfg, tmp_path, max_steps=3, amp=True, resume=True, progress=False)
    assert result.step == 3 and 0 < result.epsilon <= 10
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "checkpoint.pt")["model"].values())


@pytest.mark.slow   # about 3 minutes in Triton's interpreter on 2 CPU cores (seconds on a GPU)
def test_training_with_the_triton_backend_runs_and_resumes(data, tmp_path):
    """dp.backend=triton (Triton's interpreter here): the trainer's physical batches, noise generator
    and checkpoints go through the fused kernels; the accounting does not depend on the backend."""
    cfg = tiny_config(data, **{"dp.backend": "triton", "train.snapshot_freq": 1000})
    first = train(cfg, tmp_path, max_steps=1, progress=False)
    result = train(cfg, tmp_path, max_steps=2, resume=True, progress=False)
    assert first.step == 1 and result.step == 2
    plan = load(tmp_path / "checkpoint.pt")["privacy"]["plan"]
    assert result.epsilon == pytest.approx(epsilon_after(plan["accountant"], plan["noise_multiplier"],
                                                         plan["sample_rate"], 2, plan["delta"]))
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "checkpoint.pt")["model"].values())


def test_snapshot_grids_come_from_the_ema_weights_and_fixed_noise(finished_run, data, tmp_path):
    workdir, _ = finished_run
    trainer = Trainer(tiny_config(data), tmp_path, progress=False)
    state = load(workdir / "checkpoint.pt")
    trainer.ema.load_state_dict(state["ema"], state["ema_num_updates"])
    trainer.snapshot("again")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / "again.png")),
                          np.asarray(Image.open(workdir / "samples" / "final.png")))


def test_resuming_on_other_data_at_the_same_path_is_refused(data, tmp_path):
    folder = tiny_mnist(tmp_path / "data")
    train(tiny_config(folder), tmp_path / "run", max_steps=1, progress=False)
    for f in folder.iterdir():
        f.unlink()
    from training_helpers import _write_idx
    from dpdm_fast.data import MNIST
    real = MNIST(data, train=True, download=False)
    _write_idx(folder / "train-images-idx3-ubyte.gz", real.data.flip(0).numpy(), 2051)    # same size, other order
    _write_idx(folder / "train-labels-idx1-ubyte.gz", real.targets.flip(0).numpy(), 2049)
    test = MNIST(data, train=False, download=False)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", test.data.numpy(), 2051)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", test.targets.numpy(), 2049)
    with pytest.raises(CheckpointError, match="not the data this run was trained on"):
        Trainer(tiny_config(folder), tmp_path / "run", resume=True, progress=False)


def test_n_splits_divides_each_physical_batch_into_passes(data, tmp_path):
    trainer = Trainer(tiny_config(data, **{"dp.max_physical_batch_size": 12, "dp.n_splits": 3}), tmp_path, max_steps=1,
                      progress=False)
    assert trainer.physical_batch_size == 4
    passes = []
    original = trainer._physical_batch
    trainer._physical_batch = lambda x, y, stats: (passes.append(len(x)), original(x, y, stats))
    assert trainer.run().step == 1 and max(passes) <= 4 and trainer.engine.steps == 1
    with pytest.raises(ValueError, match="n_splits"):
        Trainer(tiny_config(data, **{"dp.n_splits": 0}), tmp_path / "b", progress=False)


def test_fp16_autocast_clips_the_unscaled_gradients_like_fp32(data, tmp_path):
    """--amp fp16 (a fixed loss scale of 2^16, divided out before clipping): the first step's clipped sum (the
    same batch and weights: same seeds) is fp32's to fp16 rounding, not 2^16 times off; the run resumes."""
    cfg = tiny_config(data, **{"train.snapshot_freq": 1000})
    sums = {}
    for amp in (None, "fp16"):
        trainer = Trainer(cfg, tmp_path / str(amp), max_steps=1, amp=amp, progress=False)
        trainer.optimizer.before_noise.append(lambda total, amp=amp: sums.setdefault(amp, total.clone()))
        assert trainer.run().step == 1
    assert 0 < rel_diff(sums["fp16"], sums[None]) < 1e-2     # measured 4.9e-4: fp16 ran, unscaled
    result = train(cfg, tmp_path / "fp16", max_steps=2, amp="fp16", resume=True, progress=False)
    assert result.step == 2
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "fp16" / "checkpoint.pt")["model"].values())


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())
