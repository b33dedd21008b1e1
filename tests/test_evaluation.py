"""Evaluation (issue 11): the Frechet distance, FID plumbing with a stand-in network, the Inception
loader without torchvision, the downstream protocol on real MNIST, the DP baseline, sample checks
and the CLI. Offline: real data from ../shared/data, nothing downloaded."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from opacus.accountants import RDPAccountant

from conftest import DATA, need
from dpdm_fast.cli import main
from dpdm_fast.evaluation import fid as fid_mod
from dpdm_fast.evaluation.downstream import epoch_orders, to_tensor, train_downstream
from dpdm_fast.evaluation.frechet import frechet_distance, statistics
from dpdm_fast.evaluation.inception import InceptionUnavailable, extractor_class, load_inception, weights_path
from dpdm_fast.evaluation.run import dp_baseline, evaluate
from dpdm_fast.evaluation.samples import SamplesError, load_samples, real_split


@pytest.fixture(scope="module")
def mnist():
    root = need(DATA / "mnist")
    return real_split("mnist", root, train=True), real_split("mnist", root, train=False), root


# -- the Frechet distance ------------------------------------------------------------------------
def _sqrt_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_on_gaussians_with_known_answers():
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(1 + 1 + 4 - 2 * 2)
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()   # commuting (diagonal) covariances
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    rng = np.random.default_rng(0)
    for d in (5, 40):   # general covariances: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), computed by eigh
        m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
        r1 = _sqrt_psd(s1)
        direct = np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1))
        assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_of_identical_and_singular_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 50))          # 10 samples in 50-d: a rank-9 covariance
    mu, sigma = statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4 * np.trace(sigma)   # rank-deficient: sqrtm is inexact
    assert math.isfinite(frechet_distance(mu, sigma, mu + 1, sigma))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# -- FID plumbing with a stand-in network ---------------------------------------------------------
class StandIn(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 8): a fixed random projection of pooled pixels (Inception's place)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16, 8)
        self.seen = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.seen.append(tuple(x.shape))
        return self.proj(nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))


def test_network_input_repeats_grayscale_and_keeps_uint8():
    img = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    x = fid_mod.to_network_input(img)
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 2]) and torch.equal(x[:, 1], torch.from_numpy(img[..., 0]))
    with pytest.raises(ValueError, match="uint8"):
        fid_mod.to_network_input(img.astype(np.float32))


def test_reference_statistics_are_cached_per_content_and_fid_separates(mnist, tmp_path):
    (train_x, _), _, root = mnist
    torch.manual_seed(0)
    net = StandIn()
    kw = dict(progress=False, batch=128)
    mu, sigma, cache, computed = fid_mod.reference_statistics("mnist", train_x[:500], net, "standin", tmp_path, **kw)
    assert computed and cache.is_file() and net.seen[0] == (128, 3, 28, 28)
    seen = len(net.seen)
    mu2, _, cache2, computed2 = fid_mod.reference_statistics("mnist", train_x[:500], net, "standin", tmp_path, **kw)
    assert not computed2 and cache2 == cache and np.array_equal(mu, mu2) and len(net.seen) == seen   # no recompute
    changed = train_x[:500].copy()
    changed[0, 0, 0, 0] ^= 1                                        # one pixel of another copy of the data
    assert fid_mod.reference_key("mnist", changed, "standin") != fid_mod.reference_key("mnist", train_x[:500], "standin")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"0" * 7)
    assert fid_mod.reference_key("mnist", train_x[:500], "standin", weights) != cache.stem.split("fid-stats-")[1]
    same = fid_mod.fid(train_x[500:1000], (mu, sigma), net, **kw)
    shifted = fid_mod.fid(np.clip(train_x[500:1000].astype(int) + 90, 0, 255).astype(np.uint8), (mu, sigma), net, **kw)
    assert 0 <= same < shifted / 10


def test_evaluate_reports_fid_and_checks_the_fid_network_before_training(mnist, tmp_path, monkeypatch):
    (x, y), _, root = mnist
    monkeypatch.setenv("DPDM_FAST_CACHE", str(tmp_path / "cache"))
    samples = _npz(tmp_path / "s.npz", x[:300], y[:300])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(samples, "mnist", root, tmp_path / "out", classifiers=[], fid=True,
                          fid_network=("standin", StandIn()), progress=False)
        assert 0 < report["fid"] < 1.0 and json.loads((tmp_path / "out" / "report.json").read_text())["fid"] == report["fid"]
        assert "## FID" in (tmp_path / "out" / "report.md").read_text()
        import dpdm_fast.evaluation.downstream as downstream
        monkeypatch.setattr(downstream, "train_downstream", lambda *a, **k: pytest.fail("trained before FID setup"))
        with pytest.raises(InceptionUnavailable):
            evaluate(samples, "mnist", root, tmp_path / "out2", classifiers=["cnn"], fid=True,
                     inception_weights=tmp_path / "missing.pth", progress=False)


# -- Inception from torch-fidelity, without torchvision -------------------------------------------
def test_inception_weights_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InceptionUnavailable, match="--inception-weights PATH"):
        weights_path(None, download=False)

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionUnavailable, match="could not be downloaded .*network unreachable.*github.com"):
        weights_path(None)
    with pytest.raises(InceptionUnavailable, match="no such file"):
        weights_path(tmp_path / "missing.pth")


def test_the_real_inception_architecture_loads_and_runs_without_torchvision(tmp_path, monkeypatch):
    """torch-fidelity's FID network with random weights (the real ones need a download): 2048-d
    features from uint8 MNIST-sized inputs, and torchvision never imported."""
    import sys
    import importlib.util
    if importlib.util.find_spec("torch_fidelity") is None:   # (importorskip would run its __init__: torchvision)
        pytest.skip("torch-fidelity is not installed: pip install --no-deps torch-fidelity==0.4.0")
    cls = extractor_class()
    monkeypatch.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    random_weights = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    monkeypatch.undo()
    path = tmp_path / "random_inception.pth"
    torch.save(random_weights, path)
    net = load_inception(path)
    img = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    with torch.no_grad():
        out = net(fid_mod.to_network_input(img))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    assert "torchvision" not in sys.modules


# -- samples ------------------------------------------------------------------------------------
def _npz(path, images, labels=None):
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("images,labels,match", [
    (np.zeros((4, 28, 28, 3), np.uint8), np.zeros(4, np.int64), "28 x 28 x 1"),
    (np.zeros((4, 32, 32, 1), np.uint8), np.zeros(4, np.int64), "28 x 28 x 1"),
    (np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int64), "uint8"),
    (np.zeros((4, 28, 28, 1), np.uint8), None, "no 'labels'"),
    (np.zeros((4, 28, 28, 1), np.uint8), np.array([0, 1, 10, -1]), "outside 0..9"),
    (np.zeros((4, 28, 28, 1), np.uint8), np.zeros(3, np.int64), "must be 4 integers"),
])
def test_samples_that_do_not_fit_are_refused(tmp_path, images, labels, match):
    with pytest.raises(SamplesError, match=match):
        load_samples(_npz(tmp_path / "s.npz", images, labels), "mnist")


def test_a_plain_npy_file_is_refused(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(SamplesError, match="not an .npz"):
        load_samples(tmp_path / "s.npy", "mnist")


def test_fewer_samples_than_the_protocol_warn_and_say_so(tmp_path):
    path = _npz(tmp_path / "s.npz", np.zeros((5, 28, 28), np.uint8), np.arange(5))
    with pytest.warns(UserWarning, match="reduced protocol: 5 samples"):
        images, labels, notes = load_samples(path, "mnist")
    assert images.shape == (5, 28, 28, 1) and labels.dtype == np.int64 and "60000" in notes[0]


# -- the downstream protocol and the DP baseline on real MNIST ------------------------------------
@pytest.mark.slow
def test_the_protocol_cnn_trained_on_the_real_training_set_reads_97_percent_after_2_epochs(mnist):
    """The real-as-synthetic check, with the released evaluation's defaults (inputs in [-1, 1], a fixed
    order): the 60,000 real training images in place of samples (about a minute on 2 cores: slow)."""
    (x, y), (xt, yt), _ = mnist
    result = train_downstream("cnn", x, y, xt, yt, epochs=2, seed=0, progress=False)
    assert (result.input_range, result.shuffle) == ("minus_one_one", "fixed")
    assert result.test_accuracy >= 0.97, result.history
    assert result.n_train == 54000 and result.n_val == 6000
    best = max(range(2), key=lambda i: result.history[i][0])           # selected by synthetic validation
    assert result.best_epoch == best + 1 and result.test_accuracy == result.history[best][1]


def test_classifier_inputs_are_in_minus_one_one_as_released_or_zero_one_on_request():
    import inspect
    assert inspect.signature(train_downstream).parameters["input_range"].default == "minus_one_one"
    images = np.array([0, 255, 128], np.uint8).reshape(3, 1, 1, 1)
    assert to_tensor(images, "minus_one_one").flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 255 * 2 - 1],
                                                                                  abs=1e-6)
    assert to_tensor(images, "zero_one").flatten().tolist() == pytest.approx([0.0, 1.0, 128 / 255])
    with pytest.raises(ValueError, match="input_range"):
        to_tensor(images, "0-1")


def test_the_training_order_is_fixed_across_epochs_unless_asked_to_shuffle():
    kept = np.array([7, 3, 9, 1, 4])
    fixed = [o.tolist() for o in epoch_orders(kept, 3, "fixed", seed=0)]
    assert fixed == [[1, 3, 4, 7, 9]] * 3                              # generation order, every epoch
    shuffled = [o.tolist() for o in epoch_orders(kept, 3, "per_epoch", seed=0)]
    assert all(sorted(o) == [1, 3, 4, 7, 9] for o in shuffled) and len({tuple(o) for o in shuffled}) > 1
    with pytest.raises(ValueError, match="shuffle"):
        list(epoch_orders(kept, 1, "sometimes", seed=0))


def test_the_report_records_the_evaluation_options_and_how_the_samples_were_made(tmp_path, mnist):
    (x, y), _, data_dir = mnist
    from dpdm_fast.generate import write_samples
    npz, _ = write_samples(x[:60], torch.from_numpy(y[:60]), tmp_path / "s.npz",
                           options={"label_mode": "random", "quantize": "truncate"})
    with pytest.warns(UserWarning, match="reduced protocol"):
        report = evaluate(npz, "mnist", data_dir, tmp_path / "out", classifiers=["logreg"], epochs=1, progress=False,
                          shuffle="per_epoch")
    assert report["evaluation_options"] == {"input_range": "minus_one_one", "shuffle": "per_epoch",
                                            "label_mode": "random", "quantize": "truncate"}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["evaluation_options"]["shuffle"] == "per_epoch"
    assert "shuffle=per_epoch" in (tmp_path / "out" / "report.md").read_text()
    assert saved["classifiers"]["logreg"]["shuffle"] == "per_epoch"
    old = _npz(tmp_path / "old.npz", x[:60], y[:60])
    with pytest.warns(UserWarning):
        report = evaluate(old, "mnist", data_dir, tmp_path / "out2", classifiers=["logreg"], epochs=1, progress=False)
    assert report["evaluation_options"]["label_mode"] == "not recorded"


def test_dp_baseline_runs_steps_and_reports_the_accountants_epsilon(mnist, tmp_path):
    _, _, root = mnist
    report = dp_baseline("mnist", root, tmp_path, epsilon=1.0, max_steps=3, progress=False)
    b = report["dp_baseline"]
    acc = RDPAccountant()
    acc.history = [(b["noise_multiplier"], 1 / math.ceil(60000 / 512), 3)]   # the Poisson loader's rate
    assert b["steps"] == 3 and b["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert 0 < b["epsilon"] < 1.0 and 0 <= b["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["dp_baseline"]["epsilon"] == b["epsilon"] and "not a full run" in saved["notes"][0]


# -- the command line ---------------------------------------------------------------------------
def _eval_cli(samples, root, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["eval", str(samples), "--dataset", "mnist", "--data-dir", str(root), *args])


def test_eval_cli_writes_the_report_with_the_reduced_protocol_stated(mnist, tmp_path, capsys):
    (x, y), _, root = mnist
    samples = _npz(tmp_path / "samples.npz", x[:2000], y[:2000])
    rc = _eval_cli(samples, root, "--classifiers", "logreg,mlp", "--epochs", "3", "--epsilon", "10",
                   "--out", str(tmp_path / "out"), "--no-progress")
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("logreg", "mlp"):
        assert 0.3 < report["classifiers"][name]["test_accuracy"] <= 1.0     # learnt something (chance: 0.1)
    assert any("2000 samples" in n for n in report["notes"]) and any("3 epochs" in n for n in report["notes"])
    assert report["paper"] == {"10.0": {"fid": 5.01, "cnn": 0.981, "logreg": 0.908, "mlp": 0.948}}
    assert "torch" in report["versions"] and "| logreg |" in (tmp_path / "out" / "report.md").read_text()


def test_eval_cli_errors_name_the_problem(mnist, tmp_path, capsys):
    (x, y), _, root = mnist
    samples = _npz(tmp_path / "samples.npz", x[:10], y[:10])
    rc = _eval_cli(samples, root, "--classifiers", "", "--fid", "--inception-weights", str(tmp_path / "nope.pth"),
                   "--out", str(tmp_path / "o"))
    assert rc == 2 and "no such file" in capsys.readouterr().err
    assert main(["eval", "--dataset", "mnist", "--data-dir", str(root), "--dp-baseline"]) == 2
    assert "--epsilon" in capsys.readouterr().err
