"""bench/gpu_check.sh, the one prepared GPU run (issue 25 item 4): its CPU dry run goes through every
section with tiny shapes, so the script cannot rot before a GPU is lent; a spent budget skips sections
and says so."""
import os
import subprocess
from pathlib import Path

from training_helpers import tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["01_env", "02_kernels", "03_engine", "04_published", "05_grid", "06_nccl", "07_train", "07_sample",
            "08_audit"]


def _run(out: Path, data: Path, budget: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--cpu-dry-run", "--data", str(data)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GPU_CHECK_BUDGET_S": str(budget)})


def test_the_gpu_script_dry_runs_every_section_on_the_cpu(tmp_path):
    data = tmp_path / "data"
    tiny_mnist(data / "mnist")
    out = tmp_path / "out"
    result = _run(out, data, budget=800)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == SECTIONS
    assert all(" rc=0 " in line for line in summary), summary
    assert "torch" in (out / "01_env.txt").read_text()
    assert "test_every_backend_on_the_published_networks_matches" in (out / "03_engine.txt").read_text()
    published = (out / "04_published.txt").read_text()
    assert "passes of" in published and "rows/s" in published and "4500 steps about" in published
    assert (out / "grid" / "results.json").exists()
    assert (out / "nccl" / "checkpoint.pt").exists() and (out / "train" / "checkpoint.pt").exists()
    assert (out / "train" / "samples.png").exists() and (out / "audit" / "report.json").exists()
    assert not (ROOT / "dpdm_fast" / "kernels").is_symlink()      # nothing left in the checkout


def test_a_spent_budget_skips_the_remaining_sections_and_says_so(tmp_path):
    out = tmp_path / "out"
    # a budget under a section's 15 s minimum from the start: every section is skipped, however fast the machine
    result = _run(out, ROOT / "tests", budget=10)   # (no data needed: the training sections are skipped)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == SECTIONS
    assert all("SKIPPED" in line and "of the budget left" in line for line in summary), summary
