"""The CPU allocator's effect on a DP step (engine/cpu_allocator.py): glibc's own policy, which mmaps every
block above 32 MiB and munmaps it on free, against freed memory kept in the process for the next pass.

Each measurement is a fresh process (the setting is process-wide and lasting), the two policies
interleaved, ``--repeats`` times each: one DP step of the configured network (K rows per example, noise
on) on ``--examples`` all-zero examples as warm-up, then ``--steps`` timed steps; per step: seconds per
example, the process's user and system CPU seconds, minor page faults; and the process's max RSS.

    python bench/cpu_allocator.py [--config CONFIG] [--examples 16] [--steps 2] [--repeats 2]
Writes bench/results/cpu_allocator.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_PROCESS = """
import json, resource, sys, time, torch
from dpdm_fast.config import load_config
from dpdm_fast.engine.cpu_allocator import keep_freed_memory
from dpdm_fast.training.memory_plan import probe_step
config, examples, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keep_freed_memory()
step = probe_step(load_config(config), torch.device("cpu"), examples)
step()                                           # warm-up: first-use costs, the heap's first growth
rows = []
for _ in range(steps):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step()
    r1, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    rows.append({"seconds": seconds, "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
                 "minor_faults": r1.ru_minflt - r0.ru_minflt})
print("RESULT", json.dumps({"steps": rows, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def measure(policy: str, config: str, examples: int, steps: int) -> dict:
    env = {**os.environ, "DPDM_FAST_CPU_ALLOCATOR": policy}
    done = subprocess.run([sys.executable, "-c", ONE_PROCESS, config, str(examples), str(steps)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{policy}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.split("RESULT", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mnist_28/train_eps_10.0.yaml")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_allocator.json"))
    args = parser.parse_args()
    runs = {"system": [], "keep": []}
    for _ in range(args.repeats):
        for policy in runs:                      # interleaved: the machine's drift hits both alike
            runs[policy].append(measure(policy, args.config, args.examples, args.steps))
    summary = {}
    for policy, measured in runs.items():
        steps = [s for m in measured for s in m["steps"]]
        summary[policy] = {
            "seconds_per_example": statistics.median(s["seconds"] for s in steps) / args.examples,
            "user_s_per_step": statistics.median(s["user_s"] for s in steps),
            "system_s_per_step": statistics.median(s["system_s"] for s in steps),
            "minor_faults_per_step": statistics.median(s["minor_faults"] for s in steps),
            "max_rss_gib": max(m["max_rss_gib"] for m in measured),
        }
        print(f"{policy:>6}: {summary[policy]['seconds_per_example']:.3f} s/example, per step "
              f"{summary[policy]['user_s_per_step']:.1f} s user + {summary[policy]['system_s_per_step']:.1f} s system, "
              f"{summary[policy]['minor_faults_per_step']:,.0f} minor faults; max RSS {summary[policy]['max_rss_gib']:.2f} GiB")
    ratio = summary["system"]["seconds_per_example"] / summary["keep"]["seconds_per_example"]
    print(f"kept / glibc's own: {ratio:.2f}x faster per example")
    import torch
    record = {"config": args.config, "examples": args.examples, "steps": args.steps, "repeats": args.repeats,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "summary": summary, "runs": runs,
              "speedup": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
