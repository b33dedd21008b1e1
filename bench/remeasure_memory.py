"""Re-measure only the peak memory of a saved benchmark run and rewrite its outputs.

Usage: python bench/remeasure_memory.py OUT_DIR   (the folder holding results.json)
"""
import json
import sys
import warnings
from pathlib import Path

from dpdm_fast.benchmarks.report import write_outputs
from dpdm_fast.benchmarks.runner import remeasure_memory

warnings.filterwarnings("ignore")
out = Path(sys.argv[1])
saved = json.loads((out / "results.json").read_text())
result = remeasure_memory(saved, threads=saved["machine"]["threads"])
result["memory_note"] = "memory re-measured with bench/remeasure_memory.py (timings from the original run)"
write_outputs(result, out)
print((out / "results.md").read_text())
