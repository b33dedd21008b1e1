"""Two source trees of dpdm_fast, one DP step each, interleaved: did a change move the step time?

Runs ``bench/step_time.py`` (of each tree) in a fresh process with that tree first on PYTHONPATH,
alternating the trees for ``--rounds`` rounds (machines here vary 30% run to run, so only ratios
measured in one interleaved run mean anything), and prints each tree's medians per engine.

Usage (e.g. before/after a refactor; ``git worktree add /tmp/before HEAD~1`` makes the old tree):
  python bench/compare_trees.py --tree before=/tmp/before --tree after=. --rounds 4 [-- --batch 16 --k 8]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

LINE = re.compile(r"^(\w+)\s+median\s+([\d.]+) ms")


def one_run(tree: Path, extra: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    out = subprocess.run([sys.executable, str(tree / "bench" / "step_time.py"), *extra], capture_output=True,
                         text=True, env=env, check=True).stdout
    return {m.group(1): float(m.group(2)) for m in map(LINE.match, out.splitlines()) if m}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (at least two)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("extra", nargs="*", help="arguments for step_time.py (after --)")
    a = ap.parse_args()
    trees = [(name, Path(path)) for name, path in (t.split("=", 1) for t in a.tree)]
    times: dict = {name: {} for name, _ in trees}
    for r in range(a.rounds):
        for name, path in (trees if r % 2 == 0 else trees[::-1]):
            for engine, ms in one_run(path, a.extra).items():
                times[name].setdefault(engine, []).append(ms)
    first = trees[0][0]
    for name, _ in trees:
        for engine, ts in times[name].items():
            ratio = statistics.median(ts) / statistics.median(times[first][engine])
            print(f"{name:8s} {engine:12s} median {statistics.median(ts):8.1f} ms over {len(ts)} runs "
                  f"(runs: {', '.join(f'{t:.1f}' for t in ts)})  {ratio:.3f}x {first}")


if __name__ == "__main__":
    main()
