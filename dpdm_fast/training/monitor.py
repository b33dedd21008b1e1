"""What a person sees during training: a progress bar, the logs, and curves at the end.

Two logs, because only one of them may leave the data's machine:
- ``metrics.jsonl``: step, epoch, eps spent, learning rate: functions of the public plan and the
  step count, nothing computed from the data (safe to share);
- ``private/diagnostics.jsonl`` and ``private/curves.png``: the training loss, the gradient norms,
  the fraction clipped, the number of examples and examples/s, computed from the private batches
  without noise, so not covered by the guarantee.
The progress bar shows the step, the epoch and eps only (a terminal log is often shared).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .private_files import private_dir

PUBLIC_LOG = "metrics.jsonl"
PRIVATE_LOG = "diagnostics.jsonl"


class StepStats:
    """Sums over the physical batches of one logical step (and over a log interval)."""

    def __init__(self):
        self.loss_sum = 0.0
        self.examples = 0
        self.norm_sum = 0.0
        self.clipped = 0

    def add_batch(self, loss_sum: float, examples: int, norm_sum: float, clipped: int) -> None:
        self.loss_sum += loss_sum
        self.examples += examples
        self.norm_sum += norm_sum
        self.clipped += clipped

    def summary(self) -> dict:
        n = self.examples or math.nan    # no examples (empty batches only): nan, not 0
        return {"loss": self.loss_sum / n, "grad_norm_mean": self.norm_sum / n, "frac_clipped": self.clipped / n}


class Monitor:
    def __init__(self, workdir: Path, total_steps: int, start_step: int, steps_per_epoch: int,
                 progress: bool = True):
        self.path = workdir / PUBLIC_LOG
        self.private_path = private_dir(workdir) / PRIVATE_LOG
        self.steps_per_epoch = steps_per_epoch
        for path in (self.path, self.private_path):
            _truncate_after(path, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.window = StepStats()
        self.window_start = time.perf_counter()

    def step(self, step: int, stats: StepStats, log: bool, eps: float | None, lr: float) -> dict | None:
        """Record one finished step; on log steps write a metrics line and refresh the bar's numbers."""
        w = self.window
        w.add_batch(stats.loss_sum, stats.examples, stats.norm_sum, stats.clipped)
        self.bar.update(1)
        if not log:
            return None
        elapsed = time.perf_counter() - self.window_start
        public = {"step": step, "epoch": step / self.steps_per_epoch, "eps": eps, "lr": lr}
        private = {"step": step, **w.summary(), "examples": w.examples,
                   "examples_per_s": w.examples / elapsed if elapsed > 0 else math.nan}
        for path, line in ((self.path, public), (self.private_path, private)):
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.bar.set_description(f"epoch {(step - 1) // self.steps_per_epoch + 1}")   # step 118 of 118 is epoch 1
        self.bar.set_postfix(eps=f"{eps:.3f}" if eps is not None else "-", refresh=False)
        self.window, self.window_start = StepStats(), time.perf_counter()
        return {**public, **private}

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr) if not self.bar.disable else print(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class SilentMonitor:
    """What ranks other than 0 use: they train, rank 0 reports."""

    def step(self, *args, **kwargs) -> None:
        return None

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def _truncate_after(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old lines."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: Path) -> Path | None:
    """private/curves.png: loss, eps spent and fraction clipped against step (private: the loss and the
    clipped fraction are computed from the private batches)."""
    eps = {r["step"]: r.get("eps") for r in read_metrics(workdir / PUBLIC_LOG)}
    rows = [{**r, "eps": eps.get(r["step"])} for r in read_metrics(private_dir(workdir) / PRIVATE_LOG)]
    if not rows:
        return None
    out = private_dir(workdir) / "curves.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("loss", "eps", "frac_clipped"),
                              ("training loss (mean per example)", "epsilon spent", "fraction of examples clipped")):
        ax.plot(steps, [r.get(key) if r.get(key) is not None else math.nan for r in rows], marker="." if len(rows) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
