import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter, which must be chosen
# before any kernel is defined (at the import of dpdm_fast.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The CLI keeps freed CPU memory in the process (engine/cpu_allocator.py), which is process-wide and lasting:
# the test process keeps glibc's own policy, so that the memory plan's tests measure the tensors' peaks
# whichever test ran before; tests/test_cpu_allocator.py runs the kept path in fresh processes.
os.environ["DPDM_FAST_CPU_ALLOCATOR"] = "system"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: tests read the real data from ../shared (see README)")
    return path


@pytest.fixture(scope="session")
def golden():
    def load(name: str) -> dict:
        return torch.load(need(REFERENCE / f"golden_{name}.pt"), weights_only=False)
    return load


@pytest.fixture(autouse=True)
def _empty_download_cache(tmp_path_factory, monkeypatch):
    """Readers look in (and download to) $DPDM_FAST_CACHE: a fresh empty one per test, never the user's."""
    monkeypatch.setenv("DPDM_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
