"""The warm-up's effect on the quick presets, side by side on one machine (issue 23).

For each (name, config, overrides) arm: train it in its own workdir (timed: warm-up stages included),
draw 2,000 samples from the final EMA weights (and, for warm-up arms, from the warm weights alone,
before any DP-SGD step), and train the protocol's CNN on them (the released evaluation's defaults),
reporting its accuracy on the real MNIST test set. Writes bench/results/warmup_effect.json and .md.

    python bench/warmup_effect.py train NAME CONFIG [key=value ...]    # one arm: train + sample
        (WARM_SAMPLES=1: also sample the warm weights alone, another ~5 minutes on 2 cores)
    python bench/warmup_effect.py evaluate                              # CNN on every arm's samples
Run arms one after another (the machine's 2 cores): timings are only comparable within one session.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "warmup_effect"
N_SAMPLES, SEED = 2000, 0
SAMPLER = dict(type="ddim", stochastic=False, num_steps=20, tmin=0.002, tmax=80.0, rho=7.0, guid_scale=2.0)


def _record(name: str, entry: dict) -> None:
    path = RESULTS / "warmup_effect.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(name, {}).update(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _sample(model, cfg, out: Path) -> float:
    from dpdm_fast.generate import generate, sample_labels, write_samples
    # balanced labels and rounding: the settings of the first arms' samples (the same for every arm)
    labels = sample_labels(N_SAMPLES, "balanced", cfg.data.n_classes)
    start = time.perf_counter()
    images = generate(model, cfg, N_SAMPLES, labels, seed=SEED, batch_size=500, sampler_options=dict(SAMPLER),
                      progress=False, quantize="round")
    write_samples(images, labels, out)
    return time.perf_counter() - start


def train_arm(name: str, config: str, overrides: list[str]) -> None:
    from dpdm_fast.config import load_config
    from dpdm_fast.generate import build_model, load_for_sampling
    from dpdm_fast.training import train
    cfg = load_config(config, overrides)
    workdir = RUNS / name
    start = time.perf_counter()
    result = train(cfg, workdir, progress=False)
    wall = time.perf_counter() - start
    entry = {"config": config, "overrides": overrides, "train_wall_s": round(wall, 1), "epsilon": result.epsilon,
             "steps": result.step, "machine": f"{platform.processor() or platform.machine()}, "
                                              f"{torch.get_num_threads()} threads, torch {torch.__version__}"}
    model, cfg = load_for_sampling(workdir / "checkpoint.pt")
    entry["sample_s"] = round(_sample(model, cfg, workdir / "samples_2000.npz"), 1)
    warm = workdir / "warmup"
    for stage in (("warm_generated", "warm_central") if os.environ.get("WARM_SAMPLES") == "1" else ()):
        if (warm / f"{stage}.pt").exists():
            model = build_model(cfg)
            model.model.load_state_dict(torch.load(warm / f"{stage}.pt", weights_only=True)["ema"])
            _sample(model.eval(), cfg, workdir / f"samples_2000_{stage}.npz")
            break
    _record(name, entry)
    print(json.dumps(entry))


def evaluate() -> None:
    from dpdm_fast.evaluation.downstream import train_downstream
    from dpdm_fast.evaluation.samples import real_split
    test_x, test_y = real_split("mnist", ROOT.parent / "shared" / "data" / "mnist", train=False)
    for workdir in sorted(RUNS.iterdir()):
        for npz in sorted(workdir.glob("samples_2000*.npz")):
            with np.load(npz) as f:
                images, labels = f["images"], f["labels"]
            result = train_downstream("cnn", images, labels, test_x, test_y, seed=SEED, progress=False)
            key = "cnn_accuracy" + npz.stem.removeprefix("samples_2000")
            _record(workdir.name, {key: result.test_accuracy})
            print(workdir.name, key, result.test_accuracy)


def report() -> None:
    """bench/results/warmup_effect.md from the JSON."""
    data = json.loads((RESULTS / "warmup_effect.json").read_text())
    lines = ["# The warm-up's effect on the quick presets (bench/warmup_effect.py)", "",
             f"{N_SAMPLES} samples per arm ({SAMPLER['type']} {SAMPLER['num_steps']} steps, guidance "
             f"{SAMPLER['guid_scale']}, balanced labels, rounded); the protocol CNN (inputs in [-1, 1], fixed order, "
             "50 epochs, best synthetic-validation epoch) tested on the 10,000 real MNIST test images.", "",
             "| arm | config + overrides | eps spent | DP-SGD steps | training wall (all stages) | sampling | CNN accuracy "
             "| warm weights alone |", "|---|---|---|---|---|---|---|---|"]
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    for name, e in data.items():
        lines.append(f"| {name} | `{e['config']}` {' '.join(e['overrides'])} | {e['epsilon']:.4f} | {e['steps']} | "
                     f"{e['train_wall_s']:.0f} s | {e['sample_s']:.0f} s | {pct(e.get('cnn_accuracy'))} | "
                     f"{pct(e.get('cnn_accuracy_warm_central'))} |")
    notes = [f"- {name}: {e['note']}" for name, e in data.items() if e.get("note")]
    lines += ["", *notes, "", f"Machine: {next(iter(data.values()))['machine']}.", ""]
    (RESULTS / "warmup_effect.md").write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_arm(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif sys.argv[1] == "evaluate":
        evaluate()
    elif sys.argv[1] == "report":
        report()
    else:
        raise SystemExit(__doc__)
