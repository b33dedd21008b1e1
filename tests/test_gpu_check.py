"""bench/gpu_check.sh, the one prepared GPU run (issue 25 item 4): its CPU dry run goes through every
section with tiny shapes, so the script cannot rot before a GPU is lent; a spent budget skips sections
and says so."""
import os
import runpy
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


def _requirements(dist: str, platform: str = "linux") -> set[str]:
    """The canonical names of ``dist``'s installed requirements on ``platform``, extras left out."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    names = set()
    for text in requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"sys_platform": platform, "extra": ""}):
            names.add(canonicalize_name(req.name))
    return names


def test_the_carried_wheels_cover_every_requirement_the_device_image_lacks():
    """A requirement added to setup.py that the device image lacks must travel as a wheel, with its own
    requirements, at the version the tests here ran with: else the prepared run fails on the GPU."""
    from importlib.metadata import version

    carry = runpy.run_path(str(ROOT / "bench" / "gpu_carry.py"))
    CARRIED, DEVICE_IMAGE = carry["CARRIED"], carry["DEVICE_IMAGE"]
    available = DEVICE_IMAGE | set(CARRIED)
    assert _requirements("dpdm_fast") <= available, _requirements("dpdm_fast") - available
    for name, pinned in CARRIED.items():
        assert version(name) == pinned, f"{name}: {version(name)} installed here, {pinned} carried"
        assert _requirements(name) <= available, (name, _requirements(name) - available)


def test_a_machine_without_the_carried_wheels_stops_before_spending_the_gpu(tmp_path):
    # a bare image, as far as this interpreter is told: omegaconf hidden (find_spec then finds nothing)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['omegaconf'] = None\n")
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--cpu-dry-run", "--data", str(ROOT / "tests")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{hide}:{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "omegaconf" in result.stdout and "bench/gpu_carry.py" in result.stdout
    assert (out / "summary.txt").read_text().startswith("00_preflight rc=3")
    assert not (out / "01_env.txt").exists()
