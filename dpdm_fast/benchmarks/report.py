"""Machine description, JSON, markdown table and plot of a benchmark run."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def machine_info(device: str, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("opacus", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    import dpdm_fast
    versions["dpdm_fast"] = dpdm_fast.__version__
    gpu = torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" and torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "device": device, "gpu": gpu, **versions}


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown_table(result: dict) -> str:
    m = result["machine"]
    head = (f"Machine: {m['gpu'] or m['cpu']} ({m['device']}, {m['threads']} threads), torch {m['torch']}, "
            f"opacus {m['opacus']}, triton {m['triton']}, {m['date']}; timing: "
            f"{result.get('timing', 'interleaved in one process')}, {result.get('repeats')} repeats\n\n")
    lines = ["| workload | B | K | engine | median step (spread) | examples/s | rows/s | peak mem | mem over non-private | x non-private | speed-up vs Opacus hooks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        if c["status"] != "ok":
            lines.append(f"| {c['workload']} | {c['B']} | {c['K']} | {c['engine']} | **{c['status']}** | | | "
                         f"{_fmt_bytes(c.get('peak_bytes'))} | | | |")
            continue
        spread = f"{c['min_s'] * 1e3:.0f}-{c['max_s'] * 1e3:.0f}"
        ratio = f"{c['x_nonprivate']:.2f}x" if c.get("x_nonprivate") else "-"
        speed = f"{c['speedup_vs_opacus_kavg']:.2f}x" if c.get("speedup_vs_opacus_kavg") else "-"
        over = "-" if c.get("mem_over_nonprivate") is None else _fmt_bytes(c["mem_over_nonprivate"])
        lines.append(f"| {c['workload']} | {c['B']} | {c['K']} | {c['engine']} | {c['median_s'] * 1e3:.0f} ms ({spread}) | "
                     f"{c['examples_per_s']:.1f} | {c['rows_per_s']:.0f} | {_fmt_bytes(c.get('peak_bytes'))} | "
                     f"{over} | {ratio} | {speed} |")
    notes = ("\n\nopacus_ghost clips each row (B*K privacy units), not each group of K rows: a speed reference, "
             "not the same algorithm. Peak memory (building the engine + two steps, fresh process per engine): CPU = peak of "
             "live tensor bytes from the torch profiler's allocation events (peak RSS is in the JSON); GPU = "
             "torch.cuda.max_memory_allocated. 'mem over non-private' = that peak minus the non-private peak.")
    return head + "\n".join(lines) + notes + "\n"


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = [c for c in result["cells"] if c["status"] == "ok"]
    workloads = sorted({c["workload"] for c in cells})
    if not workloads:
        return None
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 4 * len(workloads)), squeeze=False)
    for row, w in enumerate(workloads):
        for col, (key, label, scale) in enumerate([("median_s", "time per step (ms)", 1e3),
                                                   ("peak_bytes", "peak memory (MiB)", 1 / 2**20)]):
            ax = axes[row][col]
            for engine in sorted({c["engine"] for c in cells}):
                for K in sorted({c["K"] for c in cells}):
                    pts = sorted((c["B"], c[key] * scale) for c in cells
                                 if c["workload"] == w and c["engine"] == engine and c["K"] == K and c.get(key))
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{engine} K={K}")
            ax.set_xlabel("examples per batch B")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{w}: {label}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{m['gpu'] or m['cpu']}, {m['threads']} threads, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(result)
    (out_dir / "results.md").write_text(table)
    png = plot(result, out_dir / "results.png")
    return {"json": out_dir / "results.json", "table": out_dir / "results.md", "plot": png}
