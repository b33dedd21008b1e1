"""report.json and report.md: every number, the settings behind it, the package versions, and the
paper's row for the same dataset (and eps, when given) beside ours."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

# Dockhorn et al. (TMLR 2023), as in ../shared/REFERENCE.md section 3: {dataset: {eps: {metric: value}}};
# accuracies are fractions, LogReg / MLP published for eps=10 only.
PAPER = {
    "mnist": {0.2: {"fid": 61.9, "cnn": 0.863}, 1.0: {"fid": 23.4, "cnn": 0.953},
              10.0: {"fid": 5.01, "cnn": 0.981, "logreg": 0.908, "mlp": 0.948}},
    "fmnist": {0.2: {"fid": 78.4, "cnn": 0.723}, 1.0: {"fid": 37.8, "cnn": 0.794},
               10.0: {"fid": 18.6, "cnn": 0.862, "logreg": 0.811, "mlp": 0.830}},
    "celeba": {1.0: {"fid": 71.8}, 10.0: {"fid": 21.1}},
}


def versions() -> dict:
    import numpy
    import opacus
    import torch

    from .. import __version__
    out = {"dpdm_fast": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "opacus": opacus.__version__, "python": platform.python_version()}
    try:
        import scipy
        out["scipy"] = scipy.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        out["torch-fidelity"] = version("torch-fidelity")
    except Exception:  # not installed: FID was not computed
        pass
    return out


def paper_rows(dataset: str, epsilon: float | None) -> dict:
    rows = PAPER.get(dataset, {})
    if epsilon is None:
        return {str(e): r for e, r in rows.items()}
    return {str(e): r for e, r in rows.items() if abs(e - epsilon) < 1e-9}


def write_report(out_dir: str | Path, report: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "versions": versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    return out / "report.json", out / "report.md"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def markdown(r: dict) -> str:
    lines = [f"# Evaluation: {r.get('dataset')}", ""]
    if r.get("samples"):
        lines += [f"Samples: `{r['samples']}` ({r.get('n_samples')} images)", ""]
    for note in r.get("notes", []):
        lines += [f"**Note:** {note}", ""]
    paper = r.get("paper", {})
    if r.get("classifiers"):
        lines += ["## Downstream accuracy (trained on samples, tested on the real test set)", "",
                  "| classifier | real test accuracy | best epoch | synthetic val accuracy | epochs | paper |",
                  "|---|---|---|---|---|---|"]
        for name, c in r["classifiers"].items():
            ref = ", ".join(f"eps={e}: {_pct(row[name])}" for e, row in paper.items() if name in row) or "-"
            lines.append(f"| {name} | {_pct(c['test_accuracy'])} | {c['best_epoch']} | {_pct(c['val_accuracy'])} "
                         f"| {c['epochs']} | {ref} |")
        p = r.get("protocol", {})
        lines += ["", f"Protocol: {p.get('description', '')}", ""]
        options = r.get("evaluation_options", {})
        if options:
            lines += ["Evaluation options: " + ", ".join(f"{k}={v}" for k, v in options.items()) +
                      " (DPDM's released evaluation: input_range=minus_one_one, shuffle=fixed, label_mode=random, "
                      "quantize=truncate)", ""]
    if "fid" in r:
        ref = ", ".join(f"eps={e}: {row['fid']}" for e, row in paper.items() if "fid" in row) or "-"
        fid = "not computed" if r["fid"] is None else f"{r['fid']:.2f}"
        lines += ["## FID", "", f"FID {fid} (paper: {ref}); {r.get('fid_settings', {}).get('description', '')}", ""]
    if r.get("dp_baseline"):
        b = r["dp_baseline"]
        lines += ["## DP-SGD baseline (the CNN trained directly on real data with DP-SGD)", "",
                  f"real test accuracy {_pct(b['test_accuracy'])} at eps={b['epsilon']:.3f} (target {b['target_epsilon']}), "
                  f"delta={b['delta']:g}, sigma={b['noise_multiplier']:.4f}, {b['steps']} steps; settings: "
                  f"`{json.dumps(b['settings'])}`", ""]
    lines += ["## Versions", "", "`" + json.dumps(r.get("versions", {})) + "`", f"Created {r.get('created')}", ""]
    return "\n".join(lines)
