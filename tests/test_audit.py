"""The one-run privacy audit: its bound against independent computations, and audits of real (tiny)
training runs that must pass with DP on and must catch a leak with the noise off or broken."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpdm_fast.audit.bound import (best_bound, ceiling, epsilon_lower_bound, guess, p_value,
                                   randomized_response_right_guesses)
from dpdm_fast.config import load_config

from training_helpers import tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
AUDIT_CONFIG = ROOT / "configs" / "audit" / "mnist_quick.yaml"


# -- the bound -------------------------------------------------------------------------------------

def test_the_ceiling_is_the_papers():
    assert ceiling(100, 100, 0.0) == pytest.approx(3.49, abs=0.01)
    assert ceiling(1000, 1000, 0.0) == pytest.approx(5.81, abs=0.01)
    assert ceiling(5000, 5000, 0.0) == pytest.approx(7.42, abs=0.01)


def test_the_bound_is_valid_and_tight_against_randomized_response_monte_carlo():
    """Randomized response on each canary's bit is exactly eps-DP: the audit's bound may exceed the true eps
    in at most 5% of games (validity) and should get close to it with many guesses (power)."""
    rng = np.random.default_rng(0)
    m = r = 1000
    for eps in (0.5, 1.0, 2.0):
        right = randomized_response_right_guesses(eps, r, rng, trials=400)
        bounds = np.array([epsilon_lower_bound(m, r, int(v), delta=0.0) for v in right])
        assert np.mean(bounds > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400)   # the 95% guarantee
        assert np.median(bounds) > eps - 0.2    # and tight: 1000 guesses pin the rate to about +-0.03


def test_the_pure_dp_p_value_is_the_binomial_tail_computed_independently():
    # P[Bin(r, q) >= v] by direct summation with exact binomial coefficients
    m, r, v, eps = 200, 60, 45, 1.3
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-10)


def test_delta_adds_the_theorems_term_computed_independently():
    m, r, v, eps, delta = 500, 80, 70, 2.0, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = lambda t: sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(max(t, 0), r + 1))  # noqa: E731
    alpha = max((tail(v - i) - tail(v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail(v) + 2 * m * delta * alpha, rel=1e-9)
    # and delta > 0 can only weaken what the audit shows
    assert epsilon_lower_bound(m, r, v, delta) < epsilon_lower_bound(m, r, v, 0.0)


def test_jax_privacy_computes_the_same_bound():
    auditing = pytest.importorskip("jax_privacy.auditing", reason="jax_privacy (optional) is not installed")
    rng = np.random.default_rng(1)
    in_scores, out_scores = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    threshold = 1.5
    auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
    theirs = auditor.epsilon_one_run(significance=0.05, delta=1e-5,
                                     threshold_strategy=auditing.Explicit(threshold))
    r = int((in_scores >= threshold).sum() + (out_scores >= threshold).sum())
    v = int((in_scores >= threshold).sum())
    assert epsilon_lower_bound(600, r, v, 1e-5, 0.05) == pytest.approx(theirs, abs=1e-4)


def test_guesses_take_the_top_and_bottom_scores_and_ties_carry_no_information():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    g = guess(scores, included, plus=2, minus=2)
    assert (g.plus, g.minus, g.right) == (2, 2, 4)
    tied = np.zeros(1000)   # a score that says nothing: about half right
    inc = np.random.default_rng(0).random(1000) < 0.5
    assert 200 < guess(tied, inc, 250, 250).right < 300   # of 500 guesses
    assert best_bound(tied, inc, 1e-5).epsilon_lower_bound < 0.5


# -- audits of training runs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"), n_train=200)


def _cfg(data, **extra):
    values = {"data.path": str(data), "train.batch_size": 75, "train.n_epochs": 5, "model.network.nf": 4,
              "loss.n_noise_samples": 2, "dp.max_physical_batch_size": 64, **extra}
    return load_config(AUDIT_CONFIG, [f"{k}={v}" for k, v in values.items()])


def _audit(data, **kwargs):
    from dpdm_fast.audit.run import audit
    return audit(_cfg(data, **{"dp.backend": "torch"}), canaries=300, real_examples=150, progress=False,
                 device="cpu", **kwargs)


@pytest.fixture(scope="module")
def dp_run(data):
    return _audit(data)


def test_with_dp_on_the_lower_bound_stays_below_the_claim(dp_run):
    r = dp_run
    assert r["steps"] == 20 and r["sample_rate"] == 1 / 4 and r["noise_multiplier"] > 0.5   # q = 75 / (150 + 150)
    assert r["accountant_epsilon_of_this_run"] <= r["claimed_epsilon"] + 1e-9
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"]
    assert r["max_ceiling"] > r["claimed_epsilon"]      # so the audit could have shown a leak
    assert sum(r["included_mask"]) == r["included"] and len(r["scores"]) == 300


def test_with_the_noise_off_the_audit_detects_the_leak(data, tmp_path):
    from dpdm_fast.audit.report import write_report
    r = _audit(data, noise_multiplier=0.0)
    assert r["accountant_epsilon_of_this_run"] is None and r["accountant_mu_clt"] is None
    assert json.loads(write_report(r, tmp_path)["json"].read_text())["noise_multiplier"] == 0.0   # json has no inf
    assert r["epsilon_lower_bound"] > 2.0                # above the claim of the noised run
    steinke = r["estimators"]["eps_delta_one_run"]
    assert steinke["epsilon"] > 0.8 * r["ceiling"]       # every guess right: the (eps, delta) bound at its ceiling
    assert r["rigorous_epsilon_lower_bound"] > 2.0       # and a bound that needs no model of the scores says so too


def test_a_broken_engine_with_a_tenth_of_the_noise_is_caught(data, monkeypatch):
    from dpdm_fast.engine.clipping.backends import TorchBackend
    add_noise = TorchBackend.add_noise
    monkeypatch.setattr(TorchBackend, "add_noise", lambda self, out, std, *a: add_noise(self, out, std / 10, *a))
    r = _audit(data)
    assert r["epsilon_lower_bound"] > r["claimed_epsilon"]


def test_input_canaries_run_through_the_pipeline_and_report(dp_run, data, tmp_path):
    from dpdm_fast.audit.report import write_report
    r = _audit(data, mode="input", score_draws=8)
    assert r["mode"] == "input" and len(r["scores"]) == 300 and np.isfinite(r["scores"]).all()
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"]
    paths = write_report(r, tmp_path)
    assert json.loads(paths["json"].read_text())["claimed_epsilon"] == 2.0
    assert "eps lower bound" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 1000


def test_the_report_names_every_estimator_and_the_best(dp_run, tmp_path):
    from dpdm_fast.audit.report import write_report
    assert set(dp_run["estimators"]) == {"eps_delta_one_run", "fdp_one_run", "gdp_thresholds", "gdp_gaussian_fit"}
    assert dp_run["epsilon_lower_bound"] == max(e["epsilon"] for e in dp_run["estimators"].values())
    assert dp_run["score"]["statistic"] == "sum of released updates"
    text = write_report(dp_run, tmp_path)["markdown"].read_text()
    assert all(name in text for name in dp_run["estimators"]) and "refutes" in text and "mu-GDP" in text


def test_the_report_states_what_the_run_exercised_and_what_it_did_not(dp_run, tmp_path):
    from dpdm_fast.audit.report import write_report
    text = write_report(dp_run, tmp_path)["markdown"].read_text()
    assert "whole training pipeline" not in text.replace("not of the whole training pipeline", "")
    scope = json.loads((tmp_path / "report.json").read_text())["scope"]
    assert any("bias-free Linear" in s for s in scope["exercised"])
    assert any("Conv2d" in s for s in scope["not_exercised"]) and any("resume" in s for s in scope["not_exercised"])
    assert "Not exercised" in text and "Conv2d" in text


def test_audit_cli_writes_the_report_with_the_claim_and_the_bound(data, tmp_path):
    run = subprocess.run([sys.executable, "-m", "dpdm_fast.cli", "audit", f"data.path={data}", "train.batch_size=75",
                          "train.n_epochs=2", "model.network.nf=4", "--canaries", "100", "--real-examples", "100",
                          "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["claimed_epsilon"] == 2.0 and 0 <= report["epsilon_lower_bound"] < 2.0
    assert set(report["estimators"]) >= {"fdp_one_run", "gdp_gaussian_fit"}
    assert "claimed eps 2" in run.stdout and (tmp_path / "scores.png").exists()


# -- canaries in the network's own layers ------------------------------------------------------------

def _leave_conv_gradients_unclipped(monkeypatch):
    """An injected bug: the torch backend sums the Conv2d layers' per-example gradients without their clip
    factor (the other layers are clipped as usual)."""
    import torch
    from dpdm_fast.engine.clipping.backends import TorchBackend
    reduce = TorchBackend.reduce

    def buggy(self, job, total, noise=None, out=None):
        if job is not None and job.B:
            factors = job.factors()
            for i, p, blk in job.blocks():
                f = torch.full_like(factors, job.scale) if p.dim() == 4 else factors   # (Conv2d weights are 4-D)
                job.layout.flat_view(total, p).view(-1).addmv_(blk.t(), f.to(blk.dtype))
            job = None
        return reduce(self, job, total, noise, out)
    monkeypatch.setattr(TorchBackend, "reduce", buggy)


@pytest.fixture(scope="module")
def layer_run(data):
    return _audit(data, mode="layer")


def test_layer_canaries_with_dp_stay_below_the_claim(layer_run):
    r = layer_run
    assert r["mode"] == "layer" and r["canary_layer"] == "all_modules.10.Conv_0" and r["backend"] == "torch"   # the largest Conv2d
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"]
    assert any("named network layer" in s for s in r["scope"]["exercised"])


def test_layer_canaries_catch_a_conv_rule_that_leaves_gradients_unclipped(data, monkeypatch):
    """The gradient canaries cannot see this bug (their gradients never touch a Conv2d); the layer canaries do."""
    from dpdm_fast.audit.report import verdict
    _leave_conv_gradients_unclipped(monkeypatch)
    r = _audit(data, mode="layer")
    assert r["epsilon_lower_bound"] > r["claimed_epsilon"], r["estimators"]
    # (300 canaries: the (eps, delta) bound alone, at its sixth of the 5%, reaches 1.8 here; the mu-GDP bounds see it)
    assert verdict(r).startswith(("LEAK", "POSSIBLE LEAK"))
    blind = _audit(data)   # the gradient canaries on the same broken engine: nothing to see
    assert blind["epsilon_lower_bound"] < blind["claimed_epsilon"]


@pytest.mark.parametrize("layer", [pytest.param("all_modules.11.GroupNorm_0", marks=pytest.mark.slow),
                                   "all_modules.7.NIN_1"])
def test_layer_canaries_in_a_group_norm_and_an_attention_projection_see_a_noise_free_run(data, layer):
    """Small layers (64 and 272 parameters at nf=8) hold few nearly orthogonal directions: 100 canaries."""
    from dpdm_fast.audit.run import audit
    cfg = _cfg(data, **{"dp.backend": "torch", "model.network.attn_resolutions": "[14]", "model.network.nf": 8})
    r = audit(cfg, canaries=100, real_examples=150, progress=False, device="cpu", mode="layer", canary_layer=layer,
              noise_multiplier=0.0)
    assert r["canary_layer"] == layer and r["epsilon_lower_bound"] > 2.0


def test_a_layer_that_the_canaries_cannot_use_is_refused(data):
    with pytest.raises(ValueError, match="no such layer"):
        _audit(data, mode="layer", canary_layer="all_modules.99")
    with pytest.raises(ValueError, match="support"):
        _audit(data, mode="layer", canary_layer="all_modules.0")   # an Embedding


@pytest.mark.slow   # the Triton interpreter: about 45 s per step of this tiny run on 2 CPU cores
@pytest.mark.parametrize("mode", ["gradient", "layer"])
def test_the_triton_backend_is_audited_and_named(data, mode):
    pytest.importorskip("triton")
    from dpdm_fast.audit.run import audit
    cfg = _cfg(data, **{"dp.backend": "triton", "train.batch_size": 30, "train.n_epochs": 1,
                        "model.network.ch_mult": "[1]"})
    r = audit(cfg, canaries=40, real_examples=40, progress=False, device="cpu", mode=mode)
    assert r["backend"] == "triton" and r["steps"] == 2
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"]


# -- the Trainer audited end to end ------------------------------------------------------------------

def _trainer_audit(data, tmp_path, **extra):
    from dpdm_fast.audit.trainer_audit import audit_trainer
    cfg = _cfg(data, **{"dp.backend": "torch", "train.snapshot_freq": 1000, "train.log_freq": 5, **extra})
    return audit_trainer(cfg, tmp_path / "run", canaries=300, real_examples=150, progress=False, device="cpu")


def test_the_trainer_audit_runs_the_trainer_with_an_interruption_and_a_resume(data, tmp_path):
    r = _trainer_audit(data, tmp_path)
    assert r["interruption"] == {"stopped_after_step": 10, "resumed_to_step": 20, "releases_read": 20}
    assert r["score"]["repeated_noise_pairs"] == 0
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"]
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "samples" / "final.png").exists()


def test_a_resume_that_restores_the_noise_stream_twice_is_caught(data, tmp_path, monkeypatch):
    """The injected bug: on resume the noise generator gets back the state it had at the start of the run (as if
    an earlier checkpoint's state were restored a second time), so the second half re-uses the first half's noise."""
    from dpdm_fast.training.loop import Trainer
    restore = Trainer._restore

    def restore_noise_from_the_start(self, state):
        restore(self, state)
        self.noise_gen.manual_seed(self.seeds["noise"])
    monkeypatch.setattr(Trainer, "_restore", restore_noise_from_the_start)
    r = _trainer_audit(data, tmp_path)
    assert r["score"]["repeated_noise_pairs"] >= 5
    assert r["epsilon_lower_bound"] > r["claimed_epsilon"], r["estimators"]
    assert r["rigorous_epsilon_lower_bound"] > r["claimed_epsilon"]   # (2.41 here: a LEAK by the (eps, delta) bound)


@pytest.mark.slow   # 20 s: the default run keeps the two trainer audits above
def test_the_trainer_audit_runs_the_warm_up_stages_on_the_canaries_too(data, tmp_path):
    r = _trainer_audit(data, tmp_path, **{"warmup.enabled": "true", "warmup.central.rounds": 1,
                                          "warmup.central.downsample": 0.5, "warmup.train.central_steps": 4,
                                          "warmup.train.batch_size": 8})
    assert (tmp_path / "run" / "warmup" / "central_images.npz").exists()
    # the central images' release is in the ledger: DP-SGD got less than the whole claim
    assert r["accountant_epsilon_of_this_run"] <= r["claimed_epsilon"] + 1e-9
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"] and r["interruption"]["resumed_to_step"] == 20
