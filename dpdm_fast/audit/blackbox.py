"""Black-box, last-iterate audit (after Annamalai and De Cristofaro, NeurIPS 2024): the auditor sees the final
model only, and picks the network's starting weights and the canaries.

- Canaries crafted to be told apart. A small network cannot memorise hundreds of random images in one run:
  their updates blur into one another (400 canaries in one run: a standardised gap of 0.02 between included
  and excluded canaries without noise, 0.24 from a pre-trained start). So the canaries are spread over
  ``runs`` independent training runs of a few canaries each (random +-1 pixels, far from the data, so their
  gradients are large and always clipped), each canary with its own class label (the label's embedding is
  then mostly its canary's). Every canary is in exactly one run and the runs share no random stream, so the
  whole audit is as private, for each canary, as one run is: the one-run estimators apply to the pooled
  scores unchanged.
- The start. DP-SGD's guarantee holds whatever the initial weights, so the auditor may choose them: every
  run starts from the config's network trained ``init_steps`` steps (without privacy) on real examples held
  out from the training set, A&DC's worst case (the real training examples then move the model little).
  Measured (bench/audit_blackbox.py): with DP it is what makes the audit see anything (standardised gap 0.43,
  near the run's central-limit mu of 0.45, against 0.16 from the config's random start); without noise the
  random start separates a little better (0.97 against 0.87). ``init_steps=0``: the random start.
- Score: how much training lowered the canary's denoising loss (the same noise draws under the initial and
  the final model): a function of the final model only.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import build_dataset
from ..diffusion import build_loss
from ..generate import build_model
from ..training.loop import resolve_device
from ..training.optimizers import build_optimizer
from .run import assemble, canary_run, check_arguments

SCOPE = {
    "exercised": ["the whole network and its layer rules, the loss with K noise samples per example, Poisson "
                  "sampling, the per-example clip, the clipped sum and the Gaussian noise of the named backend, "
                  "the public divisor, BatchMemoryManager, the accountant's sigma calibration (the claim)",
                  "the final model only (black-box, last iterate): no intermediate update is read"],
    "not_exercised": ["worst-case gradients (the scores see each canary through the final model's loss only)",
                      "the Trainer: EMA, checkpoints, resume (`dpdm-fast audit --trainer`)",
                      "other starting weights than the one audited (one draw shared by every run)",
                      "the other backends than the one named", "multi-process (distributed) training"],
}
RUN_SEED_STRIDE = 10      # canary_run uses seeds seed .. seed + 6: runs must not share a stream


def worst_case_initial_state(cfg: DictConfig, held_out, steps: int, batch_size: int, seed: int,
                             device) -> dict:
    """The config's network trained ``steps`` Adam steps (the config's optimizer, no privacy) on ``held_out``
    real examples: a starting point where real data move the model little and canaries move it much."""
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    if steps == 0:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(cfg, model.parameters())
    loss_fn = build_loss(**cfg.loss)
    gen = torch.Generator().manual_seed(seed)
    if len(held_out) == 0:
        raise ValueError("the worst-case start needs held-out examples (--init-steps 0 for the config's random start)")
    loader = DataLoader(held_out, batch_size=min(batch_size, len(held_out)), shuffle=True, drop_last=True,
                        generator=gen)
    labelled = bool(cfg.data.n_classes)
    done = 0
    while done < steps:
        for x, y in loader:
            loss = loss_fn(model, x.to(device), y.to(device) if labelled else None).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def blackbox_audit(cfg: DictConfig, *, runs: int = 100, canaries_per_run: int | None = None,
                   real_examples: int = 100, init_steps: int = 300, init_examples: int = 2000,
                   noise_multiplier: float | None = None, confidence: float = 0.95, score_draws: int = 16,
                   seed: int = 0, device: str | None = None, progress: bool = True,
                   initial_state: dict | None = None) -> dict:
    """``runs`` training runs of the config with ``canaries_per_run`` input canaries each (default: one per class),
    all from one start (the network trained ``init_steps`` non-private steps on ``init_examples`` held-out real
    images; 0: the config's random initialisation);
    return the audit of the pooled final-model scores (report.json's content). ``initial_state``: starting
    weights made beforehand (``worst_case_initial_state``), to share one between audits."""
    m = canaries_per_run or (cfg.data.n_classes or 10)
    check_arguments("input", m, noise_multiplier, confidence)
    if runs < 1 or runs * m < 20:
        raise ValueError(f"--runs {runs} x {m} canaries: the pooled audit needs at least 20 canaries")
    if init_steps < 0:
        raise ValueError(f"--init-steps must be >= 0, got {init_steps}")
    dev = resolve_device(device)
    start = time.perf_counter()
    data = build_dataset(cfg.data.name, cfg.data.path)
    if init_steps == 0:
        init_examples = 0       # the random start uses no held-out data
    if real_examples + init_examples > len(data):
        raise ValueError(f"{real_examples} training + {init_examples} held-out examples: the dataset has {len(data)}")
    # held out: the examples after the training ones (canary_run trains on the first real_examples)
    held_out = Subset(data, range(real_examples, real_examples + init_examples))
    initial = initial_state or worst_case_initial_state(cfg, held_out, init_steps, 128, seed, dev)
    scores, included, first = [], [], None
    for r in tqdm(range(runs), disable=not progress, unit="run", desc="black-box audit"):
        run = canary_run(cfg, canaries=m, mode="input", noise_multiplier=noise_multiplier,
                         real_examples=real_examples, score_draws=score_draws,
                         seed=seed + RUN_SEED_STRIDE * (r + 1), device=device, progress=False,
                         initial_state=initial, distinct_labels=True)
        scores.append(run.pop("scores"))
        included.append(np.asarray(run.pop("included"), dtype=bool))
        first = first or run
    first["statistic"] = {"statistic": "decrease of the denoising loss (initial minus final model)",
                          "runs": runs, "canaries_per_run": m, "init_steps": init_steps,
                          "init_examples": init_examples}
    report = assemble(np.concatenate(scores), np.concatenate(included), cfg, confidence, mode="blackbox",
                      real_examples=real_examples, seed=seed, wall_s=time.perf_counter() - start, scope=SCOPE,
                      **first)
    report["runs"] = runs
    return report
