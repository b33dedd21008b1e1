"""What a person sees during training: a progress bar, metrics.jsonl, and curves.png at the end.

The logged loss and gradient-norm statistics are computed from the private data without noise:
they are not covered by the privacy guarantee (only the weights, the EMA and samples drawn from
them are), so keep metrics.jsonl with the private data.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


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
        self.path = workdir / "metrics.jsonl"
        self.steps_per_epoch = steps_per_epoch
        self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.window = StepStats()
        self.window_start = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old lines."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def step(self, step: int, stats: StepStats, log: bool, eps: float | None, lr: float) -> dict | None:
        """Record one finished step; on log steps write a metrics line and refresh the bar's numbers."""
        w = self.window
        w.add_batch(stats.loss_sum, stats.examples, stats.norm_sum, stats.clipped)
        self.bar.update(1)
        if not log:
            return None
        elapsed = time.perf_counter() - self.window_start
        line = {"step": step, "epoch": step / self.steps_per_epoch, **w.summary(), "eps": eps, "lr": lr,
                "examples_per_s": w.examples / elapsed if elapsed > 0 else math.nan}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.bar.set_description(f"epoch {(step - 1) // self.steps_per_epoch + 1}")   # step 118 of 118 is epoch 1
        self.bar.set_postfix(loss=f"{line['loss']:.4f}", eps=f"{eps:.3f}" if eps is not None else "-",
                             ex_s=f"{line['examples_per_s']:.0f}", refresh=False)
        self.window, self.window_start = StepStats(), time.perf_counter()
        return line

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


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """curves.png: loss, eps spent and fraction clipped against step."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
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
