"""bench/gpu_check.sh, the one prepared GPU run (issue 25 item 4): its CPU dry run goes through every
section with tiny shapes, so the script cannot rot before a GPU is lent; a spent budget skips sections
and says so."""
import ast
import os
import runpy
import subprocess
import tarfile
from pathlib import Path

from training_helpers import tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["01_env", "02_kernels", "03_engine", "04_published", "05_grid", "06_nccl", "07_train", "07_sample",
            "08_audit"]


def _run(out: Path, data: Path, budget: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--cpu-dry-run", "--data", str(data), *extra],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GPU_CHECK_BUDGET_S": str(budget)})


def test_the_gpu_script_dry_runs_every_section_on_the_cpu(tmp_path):
    data = tmp_path / "data"
    tiny_mnist(data / "mnist")
    out = tmp_path / "out"
    bundle = tmp_path / "back" / "gpu_check.tgz"     # (the device tool brings back 8 files at most: one archive)
    result = _run(out, data, 800, "--bundle", str(bundle))
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
    with tarfile.open(bundle) as archive:
        names = archive.getnames()
    assert {f"out/{name}.txt" for name in SECTIONS} <= set(names) and "out/summary.txt" in names
    assert "out/grid/results.json" in names and "out/train/samples.png" in names
    assert not [n for n in names if n.endswith((".pt", ".npz"))] and not list(bundle.parent.glob("*.partial"))


def test_a_spent_budget_skips_the_remaining_sections_and_says_so(tmp_path):
    out = tmp_path / "out"
    # a budget under a section's 15 s minimum from the start: every section is skipped, however fast the machine
    result = _run(out, ROOT / "tests", budget=10)   # (no data needed: the training sections are skipped)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == SECTIONS
    assert all("SKIPPED" in line and "of the budget left" in line for line in summary), summary


def _names(texts, platform: str = "linux") -> dict:
    """{canonical name: Requirement} of requirement strings that apply on ``platform``, extras left out."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    reqs = [Requirement(text) for text in texts]
    return {canonicalize_name(r.name): r for r in reqs
            if r.marker is None or r.marker.evaluate({"sys_platform": platform, "extra": ""})}


def _setup_requirements() -> dict:
    """setup.py's install_requires as written now (not the installed metadata, which lags until reinstalled)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return _names(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no install_requires")


def test_the_carried_wheels_cover_every_requirement_the_device_image_lacks():
    """A requirement added to setup.py that the device image lacks must travel as a wheel, at a version
    setup.py admits, with its own requirements: else the prepared run fails on the GPU."""
    from importlib.metadata import requires
    carry = runpy.run_path(str(ROOT / "bench" / "gpu_carry.py"))
    CARRIED, DEVICE_IMAGE = carry["CARRIED"], carry["DEVICE_IMAGE"]
    available = DEVICE_IMAGE | set(CARRIED)
    wanted = _setup_requirements()
    assert set(wanted) <= available, set(wanted) - available
    for name, pinned in CARRIED.items():
        if name in wanted:
            assert wanted[name].specifier.contains(pinned), f"{name}=={pinned} carried, setup.py asks {wanted[name]}"
        own = set(_names(requires(name) or []))    # (the installed version's: what pip resolved here)
        assert own <= available, (name, own - available)


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
