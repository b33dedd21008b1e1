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


def test_with_the_noise_off_the_audit_detects_the_leak(data):
    r = _audit(data, noise_multiplier=0.0)
    assert r["accountant_epsilon_of_this_run"] is None
    assert r["epsilon_lower_bound"] > 2.0                # above the claim of the noised run
    assert r["epsilon_lower_bound"] > 0.8 * r["ceiling"]


def test_a_broken_engine_with_a_tenth_of_the_noise_is_caught(data, monkeypatch):
    from dpdm_fast.engine.clipping.backends import TorchBackend
    add_noise = TorchBackend.add_noise
    monkeypatch.setattr(TorchBackend, "add_noise", lambda self, out, std, *a: add_noise(self, out, std / 10, *a))
    r = _audit(data)
    assert r["epsilon_lower_bound"] > r["claimed_epsilon"]


def test_input_canaries_run_through_the_pipeline_and_report(dp_run, data, tmp_path):
    from dpdm_fast.audit.report import write_report
    r = _audit(data, mode="input")
    assert r["mode"] == "input" and len(r["scores"]) == 300 and np.isfinite(r["scores"]).all()
    assert 0 <= r["epsilon_lower_bound"] < r["claimed_epsilon"]
    paths = write_report(r, tmp_path)
    assert json.loads(paths["json"].read_text())["claimed_epsilon"] == 2.0
    assert "eps lower bound" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 1000


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
    assert report["claimed_epsilon"] == 2.0 and 0 <= report["epsilon_lower_bound"] <= report["ceiling"]
    assert "claimed eps 2" in run.stdout and (tmp_path / "scores.png").exists()
