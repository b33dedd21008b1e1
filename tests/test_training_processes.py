"""What only a separate process can show: a signal stops a run cleanly, a killed writer loses nothing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpdm_fast.checkpoint import load

from training_helpers import CONFIG, tiny_mnist, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early (status {proc.returncode}): {proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the process")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_checkpoint_and_exits_cleanly_then_the_run_resumes(data, tmp_path, sig, status):
    # 10 epochs of 7 steps: long enough that the signal arrives mid-run
    cmd = [sys.executable, "-m", "dpdm_fast.cli", "train", str(CONFIG), *tiny_overrides(data, **{"train.n_epochs": 10}),
           "--workdir", str(tmp_path), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, out
    assert "Traceback" not in out and f"interrupted by {sig.name}" in out
    state = load(tmp_path / "checkpoint.pt")
    assert 2 <= state["step"] < 70
    assert state["privacy"]["engine"]["accountant"]["history"][0][2] == state["step"]
    resumed = subprocess.run(cmd + ["--resume", "--max-steps", str(state["step"] + 1)], capture_output=True, text=True,
                             env=_env(), cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert load(tmp_path / "checkpoint.pt")["step"] == state["step"] + 1


WRITER = """
import sys, torch
from dpdm_fast.checkpoint import save_atomic
path = sys.argv[1]
save_atomic({"step": 0, "w": torch.zeros(10)}, path)
print("ready", flush=True)
step = 0
while True:
    step += 1
    save_atomic({"step": step, "w": torch.full((4_000_000,), float(step))}, path)   # 16 MB per write
"""


def test_killing_a_writer_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for delay in (0.05, 0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                env=_env(), cwd=ROOT)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()                       # SIGKILL: no handler, no cleanup, mid-write more often than not
        proc.wait()
        state = load(path)                # never a partial file
        step = state["step"]
        assert state["w"].numel() in (10, 4_000_000)
        if step:
            assert torch.equal(state["w"], torch.full((4_000_000,), float(step)))
