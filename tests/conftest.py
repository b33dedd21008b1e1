import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: tests read the real data from ../shared (see README)")
    return path


@pytest.fixture(scope="session")
def golden():
    def load(name: str) -> dict:
        return torch.load(need(REFERENCE / f"golden_{name}.pt"), weights_only=False)
    return load
