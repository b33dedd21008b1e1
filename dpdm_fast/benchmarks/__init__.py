"""Side-by-side benchmarks of DP engines on the DPDM networks (used by ``dpdm-fast bench`` and bench/)."""
from .engines import ENGINES, WORKLOADS, build_engine

__all__ = ["ENGINES", "WORKLOADS", "build_engine"]
