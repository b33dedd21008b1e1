"""report.json, report.md and scores.png of an audit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _by(result: dict) -> str:
    name = result["best_estimator"]
    e = result["estimators"][name]
    return f"{name}: refutes {e['refutes']}, assuming {e['assumes']}"


def verdict(result: dict) -> str:
    lb, claimed = result["epsilon_lower_bound"], result["claimed_epsilon"]
    if 0 < result["noise_multiplier"] != result["calibrated_noise_multiplier"]:   # the run claims what its noise gives
        spent = result["accountant_epsilon_of_this_run"]
        return (f"noise overridden (sigma={result['noise_multiplier']:.4g}, eps {spent:.3f} by the accountant): "
                + (f"LEAK: the lower bound {lb:.3f} ({_by(result)}) exceeds it" if lb > spent
                   else f"the lower bound {lb:.3f} is below it"))
    if result["noise_multiplier"] == 0:
        return (f"noise off: the audit measured eps >= {lb:.2f} ({_by(result)}); "
                + ("it detects the leak (above the claimed eps of the noised run)" if lb > claimed
                   else "it did NOT detect a leak above the claimed eps: the audit has too little power here"))
    rigorous = result["rigorous_epsilon_lower_bound"]
    if rigorous > claimed:
        return (f"LEAK: the lower bound {rigorous:.3f} ({result['best_rigorous']}, which refutes (eps, delta)-DP for any "
                f"scores) exceeds the claimed eps {claimed:g}")
    if lb > claimed:
        return (f"POSSIBLE LEAK: the estimate {lb:.3f} ({_by(result)}) exceeds the claimed eps {claimed:g}; the "
                f"bound that needs no assumption reads {rigorous:.3f}")
    return f"consistent: the measured lower bound {lb:.3f} is below the claimed eps {claimed:g}"


def markdown(result: dict) -> str:
    r, g = result, result["guesses"]
    spent = r["accountant_epsilon_of_this_run"]
    mu = "inf (no noise)" if r["accountant_mu_clt"] is None else f"{r['accountant_mu_clt']:.4f}"
    lines = [
        f"# Privacy audit ({r['mode']} canaries, {r.get('runs', 1)} run{'s' if r.get('runs', 1) > 1 else ''})",
        "",
        f"**{verdict(r)}**",
        "",
        "| | |",
        "|---|---|",
        f"| claimed eps (config target, delta={r['delta']:g}) | {r['claimed_epsilon']:g} |",
        f"| accountant eps of this run | {'inf (no noise)' if spent is None else f'{spent:.4f}'} |",
        f"| eps lower bound ({100 * r['confidence']:.0f}% confidence, the best estimator) | "
        f"{r['epsilon_lower_bound']:.4f} ({r['best_estimator']}) |",
        f"| central-limit mu of this run's DP-SGD (for reading the GDP bounds) | {mu} |",
        f"| score | {r['score']['statistic']} |",
        f"| canaries (included) | {r['canaries']} ({r['included']}) |",
        f"| real examples | {r['real_examples']} |",
        f"| noise multiplier (calibrated) | {r['noise_multiplier']:.4f} ({r['calibrated_noise_multiplier']:.4f}) |",
        f"| sample rate, steps, K, C | {r['sample_rate']:.4f}, {r['steps']}, {r['noise_multiplicity']}, {r['max_grad_norm']:g} |",
        f"| backend, device | {r['backend']}, {r['device']} |",
        *([f"| canary layer | {r['canary_layer']} |"] if r.get("canary_layer") else []),
        f"| wall time | {r['wall_s']:.0f} s |",
        "",
        "Estimators (each at its fixed share of the significance 1 - confidence, so that the best keeps the confidence):",
        "",
        "| estimator | eps lower bound | mu lower bound | refutes | assumes |",
        "|---|---|---|---|---|",
        *[f"| {name} | {e['epsilon']:.4f} | {'-' if e.get('mu') is None else format(e['mu'], '.4f')} | "
          f"{e['refutes']} | {e['assumes']} |" for name, e in r["estimators"].items()],
        "",
        f"eps_delta_one_run: {g['right']} right of {g['top']} top + {g['bottom']} bottom guesses; ceiling "
        f"{r['ceiling']:.3f} (the most any of its guess counts could show: {r['max_ceiling']:.3f}).",
        "",
        "What this shows: a lower bound, at the stated confidence, on the eps of the parts of the pipeline "
        "that this run exercised (below), not of the whole training pipeline. A bound below the claim is "
        "consistent with the guarantee for those parts; it does not prove it (an audit can only refute). The "
        "bound cannot exceed the ceiling, however much the run leaks.",
        "",
        "Exercised by this run:",
        *[f"- {item}" for item in r["scope"]["exercised"]],
        "",
        "Not exercised (a leak there would not show in this bound):",
        *[f"- {item}" for item in r["scope"]["not_exercised"]],
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, inc = np.asarray(result["scores"]), np.asarray(result["included_mask"], dtype=bool)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[inc], bins=bins, alpha=0.6, label=f"included ({inc.sum()})")
    ax.hist(scores[~inc], bins=bins, alpha=0.6, label=f"excluded ({(~inc).sum()})")
    ax.set_xlabel("score (higher: guessed included)")
    ax.set_ylabel("canaries")
    ax.set_title(f"{result['mode']} canaries, sigma={result['noise_multiplier']:.3g}: "
                 f"eps >= {result['epsilon_lower_bound']:.2f} (claimed {result['claimed_epsilon']:g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "scores.png"}
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False))
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
