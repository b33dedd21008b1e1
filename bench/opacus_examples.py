#!/usr/bin/env python
"""Opacus's example programs, unmodified except the one import, beside Opacus on the same seed.

For each example (``mnist.py``, ``dcgan.py``, ``char-lstm-classification.py`` from a checkout of
pytorch/opacus's ``examples/``), runs it twice in fresh processes with the same arguments and seed:
once as published (Opacus) and once with ``from opacus import PrivacyEngine`` replaced by
``from dpdm_fast import PrivacyEngine``; records the exit status, the last epsilon and accuracy it
printed, and its wall time, and writes a markdown table (``--out``).

Data, all local: MNIST from ``../shared/data/mnist`` (unpacked where torchvision's ``MNIST`` looks
for it, so ``download=True`` finds it and downloads nothing); for the char-LSTM example a synthetic
"names" dataset (``--names-per-class`` names in each of 6 made-up languages, each language drawing
its letters from its own alphabet, so the classes are learnable). The examples' sources are not
shipped with the Opacus wheel: pass ``--examples`` (a folder with them, e.g. ``git clone
https://github.com/pytorch/opacus`` then ``opacus/examples``); without it the script says so and exits.

    python bench/opacus_examples.py --examples /path/to/opacus/examples [--quick]
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
SWAP = ("from opacus import PrivacyEngine\n", "from dpdm_fast import PrivacyEngine\n")
# Each run under a fixed seed (the examples themselves seed only where they take --manualSeed), with
# torchvision imported through the Opacus suite's shim (its CUDA wheel's fake nms kernel fails beside the CPU torch).
LAUNCH = ("import random, runpy, sys, numpy, torch\n{shim}\n_import_torchvision_without_meta_registrations()\n"
          "random.seed({seed}); numpy.random.seed({seed}); torch.manual_seed({seed})\n"
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n")


def launcher(seed: int) -> str:
    sys.path.insert(0, str(REPO / "tests" / "opacus_suite"))
    from run_opacus_suite import TORCHVISION_SHIM
    return LAUNCH.format(shim=TORCHVISION_SHIM, seed=seed)


def examples(data: Path, quick: bool, seed: int) -> dict:
    """{file: (arguments, epsilon regex, accuracy regex or None)} (CPU-sized settings, same for both)."""
    epochs = "1" if quick else "2"
    return {
        "mnist.py": (["--device", "cpu", "-b", "256", "--epochs", epochs, "--data-root", str(data), "--sigma", "1.0",
                      "-c", "1.0", "--lr", "0.5", "--n-runs", "1"],
                     r"ε = ([\d.]+)", r"Accuracy: \d+/\d+ \(([\d.]+)%\)"),
        "dcgan.py": (["--device", "cpu", "--data-root", str(data), "--epochs", "1", "--batch-size", "64", "--ngf", "16",
                      "--ndf", "16", "--workers", "0", "--outf", "dcgan_out", "--manualSeed", str(seed),
                      "--target-digit", "8", "--sigma", "1.0"],
                     r"ε = ([\d.]+)", None),
        "char-lstm-classification.py": (["--device", "cpu", "--data-root", str(data / "names"), "--epochs", epochs,
                                         "--batch-size", "64", "--sigma", "1.0", "--learning-rate", "1.0"],
                                        r"ε = ([\d.]+)", r"Test Accuracy: ([\d.]+)"),
    }


def prepare_data(root: Path, names_per_class: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if not MNIST.exists():
        sys.exit(f"MNIST not found at {MNIST} (the repository's ../shared/data/mnist)")
    for f in MNIST.glob("*.gz"):
        with gzip.open(f) as src, open(raw / f.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    names = root / "names"
    names.mkdir()
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for lang in ["Aish", "Boru", "Ceth", "Dov", "Elan", "Fyr"]:
        alphabet = rng.sample(letters, 8)
        rows = ["".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9))).capitalize()
                for _ in range(names_per_class)]
        (names / f"{lang}.txt").write_text("\n".join(rows) + "\n")


def run(script: Path, args: list[str], cwd: Path, timeout: float, seed: int) -> tuple[int | str, str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", launcher(seed), str(script), *args], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", out, time.time() - t0


def table_row(name: str, runs: dict) -> str:
    def stats(values: list) -> str:
        nums = [float(v) for v in values if v != "-"]
        if not nums:
            return "-"
        mean = sum(nums) / len(nums)
        sd = (sum((v - mean) ** 2 for v in nums) / max(1, len(nums) - 1)) ** 0.5
        return f"{mean:.4g} ± {sd:.2g}" if len(nums) > 1 else f"{mean:.4g}"
    o, d = runs["opacus"], runs["dpdm_fast"]
    wall_o, wall_d = (sum(r[3] for r in x) / len(x) for x in (o, d))
    exits = f"{','.join(str(r[0]) for r in o)} / {','.join(str(r[0]) for r in d)}"
    eps = f"{'/'.join(sorted({r[1] for r in o}))} / {'/'.join(sorted({r[1] for r in d}))}"
    acc = f"{stats([r[2] for r in o])} / {stats([r[2] for r in d])}"
    errors = "; ".join(sorted({r[4] for r in o + d if r[4]}))
    finished = all(r[0] == 0 for r in o + d)   # a speed-up only between runs that both finished
    speed = f"{wall_o / wall_d:.2f}x" if finished else "-"
    return (f"| {name} | {exits} | {eps} | {acc} | {wall_o:.0f} / {wall_d:.0f} | {speed} |"
            + (f" {errors}" if errors else ""))


def last(pattern: str | None, text: str) -> str:
    found = re.findall(pattern, text) if pattern else []
    return found[-1] if found else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=Path, default=None, help="folder holding Opacus's example programs")
    ap.add_argument("--only", nargs="*", default=None, help="run only these example files")
    ap.add_argument("--quick", action="store_true", help="one epoch each (default: two for mnist and char-lstm)")
    ap.add_argument("--names-per-class", type=int, default=400)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--seeds", type=int, default=2, help="runs per engine and example (seeds 1..N)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "opacus_examples.md")
    a = ap.parse_args()
    if a.examples is None or not a.examples.is_dir():
        sys.exit("pass --examples: a folder with Opacus's example programs (they are not in the opacus wheel): "
                 "git clone https://github.com/pytorch/opacus, then --examples opacus/examples")
    work = Path(tempfile.mkdtemp(prefix="opacus_examples_"))
    data = work / "data"
    prepare_data(data, a.names_per_class)
    rows = []
    for name in examples(data, a.quick, 0):
        if a.only and name not in a.only:
            continue
        source = (a.examples / name).read_text()
        if source.count(SWAP[0]) != 1:
            sys.exit(f"{name}: expected exactly one {SWAP[0].strip()!r} to swap")
        runs = {"opacus": [], "dpdm_fast": []}
        for seed in range(1, a.seeds + 1):
            args, eps_re, acc_re = examples(data, a.quick, seed)[name]
            for engine in (("opacus", "dpdm_fast") if seed % 2 else ("dpdm_fast", "opacus")):   # interleaved
                cwd = work / f"{engine}_{seed}_{name}"
                cwd.mkdir()
                script = cwd / name
                script.write_text(source if engine == "opacus" else source.replace(*SWAP))
                rc, out, wall = run(script, args, cwd, a.timeout, seed)
                (work / f"{engine}_{seed}_{name}.log").write_text(out)
                tail = out.strip().splitlines()[-1][:200] if rc != 0 and out.strip() else ""
                runs[engine].append((rc, last(eps_re, out), last(acc_re, out), wall, tail))
                print(f"{name} seed {seed} [{engine}]: exit {rc}, eps {runs[engine][-1][1]}, "
                      f"accuracy {runs[engine][-1][2]}, {wall:.0f} s {tail}", flush=True)
        rows.append(table_row(name, runs))
    import platform
    import torch
    header = [f"# Opacus's examples with the import swapped ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}; seeds 1..{a.seeds}, the engines alternated; arguments per example in "
              f"`bench/opacus_examples.py`{' (--quick)' if a.quick else ''}; logs in {work}.", "",
              "| example | exits (Opacus / dpdm_fast) | last ε | accuracy, mean ± sd over seeds | wall s, mean | "
              "speed-up |", "|---|---|---|---|---|---|"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(header + rows) + "\n")
    print("\n".join(header + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
