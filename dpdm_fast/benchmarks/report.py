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
    return head + ratio_table(result) + "\n" + "\n".join(lines) + notes + "\n"


def ratio_table(result: dict) -> str:
    """One line per (workload, B, K): each engine's step time over the non-private one (or why not)."""
    engines = [e for e in result["engines"] if e != "nonprivate"]
    lines = ["| workload | B | K | rows | non-private step | " + " | ".join(f"{e} / non-private" for e in engines) + " |",
             "|---|---|---|---|---|" + "---|" * len(engines)]
    keys = sorted({(c["workload"], c["B"], c["K"]) for c in result["cells"]},
                  key=lambda k: (k[0], k[1] * k[2], k[1]))
    for w, B, K in keys:
        by = {c["engine"]: c for c in result["cells"] if (c["workload"], c["B"], c["K"]) == (w, B, K)}
        base = by.get("nonprivate", {})
        base_txt = f"{base['median_s'] * 1e3:.0f} ms" if base.get("status") == "ok" else _short(base.get("status"))
        vals = []
        for e in engines:
            c = by.get(e, {})
            vals.append(f"{c['x_nonprivate']:.2f}x" if c.get("x_nonprivate") else _short(c.get("status")))
        lines.append(f"| {w} | {B} | {K} | {B * K} | {base_txt} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _short(status: str | None) -> str:
    if status is None:
        return "-"
    if status == "ok":
        return "no non-private time"
    short = status.split(" (")[0]  # the estimate in parentheses is in the detailed table
    return short if len(short) <= 48 else short[:45] + "..."


def plot(result: dict, path: Path) -> Path | None:
    """Per workload: DP step / non-private step per engine across the grid (bars), and step times."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = result["cells"]
    workloads = sorted({c["workload"] for c in cells})
    engines = [e for e in result["engines"] if e != "nonprivate"]
    if not workloads:
        return None
    fig, axes = plt.subplots(len(workloads), 2, figsize=(15, 4.5 * len(workloads)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(engines))
    for row, w in enumerate(workloads):
        keys = sorted({(c["B"], c["K"]) for c in cells if c["workload"] == w}, key=lambda k: (k[0] * k[1], k[0]))
        by = {(c["B"], c["K"], c["engine"]): c for c in cells if c["workload"] == w}
        ax = axes[row][0]
        top = 2.0
        for i, e in enumerate(engines):
            xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(keys))]
            ys = [by.get((B, K, e), {}).get("x_nonprivate") for B, K in keys]
            ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], width, label=e)
            for x, y in zip(xs, ys):
                if y:
                    ax.text(x, y + 0.02, f"{y:.2f}", rotation=90, ha="center", va="bottom", fontsize=6)
            top = max([top] + [y for y in ys if y])
            for x, (B, K), y in zip(xs, keys, ys):
                if not y:
                    status = by.get((B, K, e), {}).get("status") or "-"
                    label = "OOM" if "memory" in status else "too slow" if "slow" in status else "failed"
                    ax.text(x, 0.05, label, rotation=90, ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.25, color="red", lw=0.8, ls="--", label="1.25x")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"B={B}\nK={K}" for B, K in keys], fontsize=7)
        ax.set_ylim(0, min(top * 1.12, 6))
        ax.set_ylabel("DP step / non-private step")
        ax.set_title(f"{w}: cost of privacy per engine (lower is better; 1 = non-private)")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax = axes[row][1]
        for e in result["engines"]:
            pts = [(B * K, by[(B, K, e)]["median_s"]) for B, K in keys if by.get((B, K, e), {}).get("status") == "ok"]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=e)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows per step (B x K)")
        ax.set_ylabel("median step time (s)")
        ax.set_title(f"{w}: step time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{m['gpu'] or m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(result: dict, out_dir: Path) -> Path:
    """results.json alone (written after each row of a grid, so a run cut off keeps what it measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def write_outputs(result: dict, out_dir: Path) -> dict:
    write_json(result, out_dir)
    table = markdown_table(result)
    (out_dir / "results.md").write_text(table)
    png = plot(result, out_dir / "results.png")
    return {"json": out_dir / "results.json", "table": out_dir / "results.md", "plot": png}
