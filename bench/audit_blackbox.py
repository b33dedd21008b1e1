"""The black-box, last-iterate audit's power (issue 24, item 6): the default setting
(configs/audit/mnist_blackbox.yaml, claimed eps 2 at delta 1e-5) with the noise off, with DP, and, to show what
the worst-case start does, with the noise off from the config's random initialisation.

    python bench/audit_blackbox.py [--runs 20]     # ~3 minutes for the start, then ~8 s per run on 2 CPU cores

Writes bench/results/audit_blackbox.{json,md}. One worst-case start is made and shared by the arms that use it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "audit" / "mnist_blackbox.yaml"
ARMS = {"noise off, worst-case start": (0.0, True), "DP (calibrated noise), worst-case start": (None, True),
        "noise off, the config's random start": (0.0, False), "DP (calibrated noise), the config's random start":
        (None, False)}


def row(name: str, r: dict, start_s: float) -> dict:
    s, inc = np.asarray(r["scores"]), np.asarray(r["included_mask"])
    gap = (s[inc].mean() - s[~inc].mean()) / np.sqrt((s[inc].var() + s[~inc].var()) / 2)
    return {"arm": name, "runs": r["runs"], "canaries": r["canaries"], "sigma": r["noise_multiplier"],
            "claimed_epsilon": r["claimed_epsilon"], "standardised_gap": round(float(gap), 3),
            "best": r["best_estimator"], "bounds": {k: e["epsilon"] for k, e in r["estimators"].items()},
            "wall_s": round(r["wall_s"] + start_s, 1)}


def markdown(rows: list[dict]) -> str:
    names = list(rows[0]["bounds"])
    lines = ["# Black-box audit (bench/audit_blackbox.py)", "",
             "Claimed eps 2 at delta 1e-5 (configs/audit/mnist_blackbox.yaml: the quick audit network, K=2, 60 steps "
             "at q = 18/105, 100 real MNIST images per run, 10 input canaries per run with one label each); the "
             "final model only; the worst-case start is the network trained 300 non-private steps on 2,000 held-out "
             "MNIST images (its ~160 s are in both worst-case arms' wall times). Standardised gap: (mean score in - "
             "mean score out) / pooled sd; the run's central-limit mu with DP is 0.446 (eps 1.76).", "",
             "| arm | runs (canaries) | sigma | standardised gap | " + " | ".join(names) + " | best | wall |",
             "|---|---|---|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['runs']} ({r['canaries']}) | {r['sigma']:.3f} | {r['standardised_gap']:.2f} | "
                     + " | ".join(f"{r['bounds'][n]:.2f}" for n in names)
                     + f" | {max(r['bounds'].values()):.2f} | {r['wall_s']:.0f} s |")
    lines += ["", f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}.", ""]
    return "\n".join(lines)


def main() -> None:
    from torch.utils.data import Subset

    from dpdm_fast.audit.blackbox import blackbox_audit, worst_case_initial_state
    from dpdm_fast.config import load_config
    from dpdm_fast.data import build_dataset
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    cfg = load_config(CONFIG, ["dp.backend=torch"])
    t = time.perf_counter()
    worst, start_s = None, 0.0
    if any(ARMS[name][1] for name in args.arms):
        held_out = Subset(build_dataset(cfg.data.name, cfg.data.path), range(100, 2100))   # as blackbox_audit's
        worst = worst_case_initial_state(cfg, held_out, 300, 128, 0, torch.device("cpu"))
        start_s = time.perf_counter() - t
    path = RESULTS / "audit_blackbox.json"
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["arm"] not in args.arms]
    for name in args.arms:
        sigma, worst_case = ARMS[name]
        r = blackbox_audit(cfg, runs=args.runs, noise_multiplier=sigma, progress=False, device="cpu",
                           init_steps=300 if worst_case else 0, initial_state=worst if worst_case else None)
        rows.append(row(name, r, start_s if worst_case else 0.0))
        print(json.dumps(rows[-1]), flush=True)
        rows.sort(key=lambda r: list(ARMS).index(r["arm"]))
        path.write_text(json.dumps(rows, indent=1))
        (RESULTS / "audit_blackbox.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
