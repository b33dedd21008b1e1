"""Distributed DP-SGD on torch.distributed (gloo, 2 processes spawned here): the same update and the
same guarantee as one process, noise drawn once, replicas that never diverge, and ranks that stop
together (with a clear error, never a hang) when one breaks the rules or dies."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from opacus.accountants import RDPAccountant

from dpdm_fast.checkpoint import load
from dpdm_fast.training.privacy_plan import epsilon_after

from distributed_workers import BATCH, DELTA, N, SCENARIOS, free_port, rank_main, scenario
from training_helpers import CONFIG, tiny_mnist, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def spawn(tmp_path: Path, task: str, world: int = 2, **kwargs) -> list[dict]:
    """Run ``task`` on ``world`` gloo ranks; every rank's result or error. Fails (and kills them) on a hang."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, str(tmp_path), task, kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"rank(s) {hung} still running after {TIMEOUT} s: a hang"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _ok(result: dict):
    assert "ok" in result, result.get("trace")
    return result["ok"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario on 2 ranks (one spawn), and each scenario's one-process run."""
    return [_ok(r) for r in spawn(tmp_path_factory.mktemp("ranks"), "all_scenarios")]


@pytest.fixture(scope="module")
def one_process():
    return {name: scenario(name, distributed=False) for name, c in SCENARIOS.items() if not c["secure"]}


def test_the_ranks_split_each_poisson_batch_of_one_process_between_them(ranks, one_process):
    for name in one_process:
        for step, whole in enumerate(one_process[name]["batches"]):
            shards = [r[name]["batches"][step] for r in ranks]
            assert all(i % 2 == rank for rank, shard in enumerate(shards) for i in shard)   # each its own shard
            assert sorted(shards[0] + shards[1]) == whole, (name, step)
    assert {len(b) for b in one_process["adam_noisy"]["batches"]} != {BATCH}   # Poisson sizes, not fixed batches
    assert any(not shard for r in ranks for shard in r["sparse_noisy"]["batches"])   # an empty shard was stepped
    secure = [r["secure"]["batches"] for r in ranks]   # own OS-seeded masks: still disjoint shards
    for step in range(3):
        assert all(i % 2 == rank for rank in (0, 1) for i in secure[rank][step])


def test_one_step_gives_the_same_update_on_one_and_two_ranks(ranks, one_process):
    reference = one_process["sgd_clean"]["params"]
    update = reference[1] - reference[0]
    assert update.norm() > 1e-3       # a real update (SGD with lr 1: minus the DP gradient)
    for r in ranks:
        assert torch.equal(r["sgd_clean"]["params"][0], reference[0])    # rank 0's initial weights everywhere
        torch.testing.assert_close(r["sgd_clean"]["params"][1], reference[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd_noisy", "sparse_noisy"])
def test_with_noise_the_ranks_reproduce_the_one_process_run_because_rank_0_draws_the_noise_once(ranks, one_process,
                                                                                               name):
    reference = one_process[name]["params"]
    for r in ranks:
        for step in range(1, SCENARIOS[name]["steps"] + 1):
            torch.testing.assert_close(r[name]["params"][step], reference[step], rtol=0, atol=1e-5)


def _noise_variance(result: dict) -> float:
    """The update of a zero loss is -lr * noise / B: the variance of noise / (sigma C) per coordinate."""
    c = SCENARIOS["noise_only"]
    z = (result["params"][0] - result["params"][1]) * result["expected_batch"] / (c["lr"] * c["sigma"] * 1.0)
    return float(z.var())


def test_the_noise_has_variance_sigma_c_squared_and_a_double_noised_run_fails_the_check(ranks, one_process):
    coordinates = ranks[0]["noise_only"]["params"][0].numel()
    assert coordinates > 200_000       # the variance's standard error is about sqrt(2 / n) < 0.0032
    assert abs(_noise_variance(one_process["noise_only"]) - 1) < 0.02
    for r in ranks:
        assert abs(_noise_variance(r["noise_only"]) - 1) < 0.02
    # noise added on both ranks (from generators seeded alike, as here: twice the same draw, variance 4;
    # independent generators would give 2): the same check fails
    doubled = _noise_variance(ranks[0]["noise_only_double"])
    assert not abs(doubled - 1) < 0.02 and abs(doubled - 4) < 0.1


def test_parameters_stay_identical_on_every_rank_after_every_step(ranks):
    for name in ranks[0]:
        steps = ranks[0][name]["params"]
        assert len(steps) == SCENARIOS[name.replace("_double", "")]["steps"] + 1
        for step, params in enumerate(steps):
            assert torch.equal(params, ranks[1][name]["params"][step]), (name, step)
        assert not torch.equal(steps[0], steps[-1])


def test_epsilon_is_the_same_on_every_rank_and_equals_the_one_process_run(ranks, one_process):
    for name, c in SCENARIOS.items():
        if c["sigma"] == 0:
            continue
        q = c["batch"] / N
        fresh = RDPAccountant()
        fresh.history = [(c["sigma"], q, c["steps"])]
        expected = fresh.get_epsilon(DELTA)
        for r in ranks:
            assert r[name]["steps"] == c["steps"] and r[name]["sample_rate"] == q
            assert r[name]["expected_batch"] == c["batch"]          # the global expected batch, not a rank's share
            assert r[name]["epsilon"] == pytest.approx(expected, rel=1e-12)
            if name in one_process:
                assert r[name]["epsilon"] == one_process[name]["epsilon"]


@pytest.mark.parametrize("kind", ["setting", "double_backward", "crash", "forward_error", "permuted"])
def test_a_rank_that_breaks_the_rules_or_dies_stops_every_rank_with_a_clear_error(tmp_path, kind):
    results = spawn(tmp_path, "refusal", kind=kind)     # (spawn fails the test on a hang)
    assert all("error" in r for r in results), results
    rank0, rank1 = results
    assert rank0["error"] == "ReplicaError"
    if kind == "setting":   # one rank lowered its noise: both refuse, naming what differs
        assert rank1["error"] == "ReplicaError"
        assert all("disagree on noise_multiplier" in r["message"] for r in results)
    elif kind == "double_backward":   # its own check refuses; the other learns it refused
        assert rank1["error"] == "RuntimeError" and "clipped" in rank1["message"]
        assert "rank(s) [1] refused step 2" in rank0["message"]
    elif kind == "crash":   # died: the other's collective fails promptly instead of waiting forever
        assert rank1["error"] == "SystemExit"
        assert "Another rank has most likely stopped with an error" in rank0["message"]
    elif kind == "forward_error":   # abandon_step told the others at once; rank 1 was still alive for 15 s
        assert rank1["error"] == "RuntimeError" and "boom" in rank1["message"]
        assert "rank(s) [1] refused step 2" in rank0["message"] and rank1["at"] - rank0["at"] > 10
    else:   # the same examples in another order: sharding by position could put one example on both ranks
        assert rank1["error"] == "ReplicaError"
        assert all("disagree on dataset (an order-sensitive hash" in r["message"] for r in results)
        assert all("values withheld" in r["message"] and "rank 0:" not in r["message"] for r in results)


def test_make_private_in_a_multi_process_job_wants_an_explicit_choice_accepts_dpddp_and_refuses_torch_ddp(tmp_path):
    results = [_ok(r) for r in spawn(tmp_path, "wrapping_choices")]
    for rank, errors in enumerate(results):
        assert "pass make_private(distributed=True)" in errors["implicit"]
        assert "DistributedDataParallel" in errors["ddp"]
        assert errors["shards"] == [(rank, 2), (rank, 2), True, True]   # DPDDP and with_epsilon: sharded, all-reduced
    assert results[0]["sigma"] == results[1]["sigma"] > 0


# -- dpdm-fast train on 2 ranks -------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _train(data, workdir, *extra, overrides=()):
    return [sys.executable, "-m", "dpdm_fast.cli", "train", str(CONFIG), *tiny_overrides(data), *overrides,
            "--workdir", str(workdir), "--no-progress", *extra]


def _ranks_by_hand(cmds, port):
    """Start each command as one rank (the environment torchrun would give it), with its own PID."""
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(cmds)),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r, cmd in enumerate(cmds)]


def _launch(data, workdir, *extra):
    run = subprocess.run(_train(data, workdir, *extra, overrides=["dp.autotune=false"]), capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def _two_ranks():
    return ["--nproc-per-node", "2", "--master-port", str(free_port())]


def test_two_rank_training_writes_once_and_resumes_exactly_on_two_ranks_and_on_one(data, tmp_path):
    run, straight = tmp_path / "sliced", tmp_path / "straight"
    out = _launch(data, run, "--max-steps", "3", *_two_ranks())
    assert "2 processes (gloo)" in out and out.count("stopped at --max-steps 3") == 1   # rank 0 reports
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]       # one set of logs
    state = load(run / "checkpoint.pt")
    assert state["step"] == 3 and state["rng"]["world_size"] == 2 and "per_rank" not in state["rng"]
    assert len(load(run / "private" / "resume_state.pt")["streams"]) == 2   # each rank's streams, kept private
    plan = state["privacy"]["plan"]
    assert state["privacy"]["engine"]["accountant"]["history"] == [(plan["noise_multiplier"], plan["sample_rate"], 3)]
    one_process_eps = epsilon_after("rdp", plan["noise_multiplier"], plan["sample_rate"], 3, plan["delta"])
    assert state["privacy"]["epsilon"] == one_process_eps and plan["sample_rate"] == 1 / 7   # q of batch 32 of 200

    # on 2 ranks again: every generator (each rank's own included) continues, as if never stopped
    out = _launch(data, run, "--resume", "--max-steps", "5", *_two_ranks())
    assert "re-derived" not in out
    _launch(data, straight, "--max-steps", "5", *_two_ranks())
    sliced, whole = load(run / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert sliced["step"] == whole["step"] == 5
    for key in whole["model"]:
        assert torch.equal(sliced["model"][key], whole["model"][key]), key
    assert sliced["privacy"]["epsilon"] == whole["privacy"]["epsilon"]

    # on 1 rank, then on 2 again: the ledger and the step carry over; the per-rank streams are re-derived
    out = _launch(data, run, "--resume", "--max-steps", "6")
    assert "resuming a run of 2 process(es) on 1" in out
    state = load(run / "checkpoint.pt")
    assert state["step"] == 6 and state["rng"]["world_size"] == 1
    out = _launch(data, run, "--resume", "--max-steps", "7", *_two_ranks())
    assert "resuming a run of 1 process(es) on 2" in out
    state = load(run / "checkpoint.pt")
    assert state["step"] == 7 and state["privacy"]["engine"]["accountant"]["history"][0][2] == 7
    assert state["privacy"]["epsilon"] == epsilon_after("rdp", plan["noise_multiplier"], plan["sample_rate"], 7,
                                                        plan["delta"])


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(data, tmp_path):
    cmd = _train(data, tmp_path, overrides=["train.n_epochs=10"])
    procs = _ranks_by_hand([cmd, cmd], free_port())
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.stdout.read() for p in procs]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)          # rank 1 only: rank 0 must stop after the same step
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs
    assert "interrupted by SIGTERM" in outs[0] and "Traceback" not in outs[0] + outs[1]
    state = load(tmp_path / "checkpoint.pt")
    assert 2 <= state["step"] < 70 and state["privacy"]["engine"]["accountant"]["history"][0][2] == state["step"]


def test_ranks_on_different_data_refuse_to_start(data, tmp_path):
    other = tiny_mnist(tmp_path / "other", n_train=201)
    procs = _ranks_by_hand([_train(data, tmp_path / "run"),
                            _train(data, tmp_path / "run", overrides=[f"data.path={other}"])], free_port())
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert all("the ranks disagree on training data" in out for out in outs)
    assert all("values withheld" in out for out in outs)   # a hash of the data is not printed into logs
    assert "[rank 1]" in outs[1]


def test_sigterm_to_the_launcher_reaches_every_rank_and_the_run_stops_with_a_checkpoint(data, tmp_path):
    cmd = _train(data, tmp_path, "--nproc-per-node", "2", "--master-port", str(free_port()),
                 overrides=["train.n_epochs=10"])
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env())
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)      # torchrun passes it to both ranks
    out = launcher.communicate(timeout=180)[0]
    assert launcher.returncode == 143, out
    assert out.count("interrupted by SIGTERM") == 1 and "Traceback" not in out
    state = load(tmp_path / "checkpoint.pt")
    assert state["privacy"]["engine"]["accountant"]["history"][0][2] == state["step"] >= 2


def test_two_cpu_ranks_on_one_node_plan_auto_passes_on_half_its_memory_each(data, tmp_path):
    """Both ranks run passes of the planned size at once on the node's memory: the plan says it took the
    share torchrun's LOCAL_WORLD_SIZE gives (planned on the whole node, two ranks would overcommit it)."""
    out = _launch(data, tmp_path, "--max-steps", "1", *_two_ranks(), "dp.max_physical_batch_size=auto")
    assert "this process's share: 2 processes of the run on this node's memory" in out, out
    assert "physical batch (dp.max_physical_batch_size: auto)" in out and "stopped at --max-steps 1" in out
