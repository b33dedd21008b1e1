"""One audited training run: canaries in, the config's DP training through the engine, scores, bound.

The run uses the training pipeline's pieces unchanged: the config's denoiser and loss with K noise
samples per example, ``PrivacyEngine.make_private`` with Poisson sampling at the plan's rate, the
configured backend, ``BatchMemoryManager`` physical batches, Adam, and the noise multiplier the
privacy plan calibrates for (``dp.epsilon``, ``dp.delta``) over the whole schedule (or
``noise_multiplier`` to override it, e.g. 0 to check that the audit detects a leak).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..data import build_dataset
from ..diffusion import build_loss
from ..engine import BatchMemoryManager
from ..engine.sampling.poisson import PoissonDataLoader
from ..generate import build_model
from ..training.loop import resolve_device
from ..training.memory_plan import pass_size
from ..training.optimizers import build_optimizer
from ..training.privacy_plan import plan_privacy, quiet_accountant
from .canaries import AuditDataset, CanaryDenoiser, random_images, with_canary_terms
from .estimators import estimate_all
from .gaussian_dp import dp_sgd_mu
from .layer_canaries import LayerCanaries, default_layer
from .scores import white_box_scores

MODES = ("gradient", "layer", "input")

# What each mode's run puts to the test, and what it leaves out (report.json's "scope"; said in report.md).
COMMON_SCOPE = ["Poisson sampling at the plan's rate (PoissonDataLoader, with empty batches)",
                "the per-example clip over all parameters, the clipped sum and the Gaussian noise of the named backend",
                "the update's divisor from the public expected batch size", "BatchMemoryManager's physical batches",
                "the accountant's sigma calibration (the claim)"]
_NEVER = ["the Trainer: EMA, checkpoints, resume (`dpdm-fast audit --trainer` audits those)",
          "the other backends than the one named", "multi-process (distributed) training"]
SCOPE = {
    "gradient": {
        "exercised": ["the canary parameter vector's path through the engine's rule for a bias-free Linear layer "
                      "(each canary's gradient is a one-hot direction in it)", *COMMON_SCOPE],
        "not_exercised": ["the network's own layer rules (Conv2d, GroupNorm, attention, ...): the canaries' gradients "
                          "never touch them, so a bug that left those gradients unclipped would not be seen "
                          "(--mode layer puts one of them to the test)",
                          "the loss's K-row layout for the canaries (their loss is the canary term only)", *_NEVER],
    },
    "layer": {
        "exercised": ["the engine's rule for the named network layer (its per-example gradients of the canaries, "
                      "their norms and clipping), inside the real network's forward and backward, with the loss's "
                      "K rows per example", *COMMON_SCOPE],
        "not_exercised": ["the rules of the network's other layers (the canaries' gradients lie in the named layer "
                          "only: audit another layer with --canary-layer)", *_NEVER],
    },
    "input": {
        "exercised": ["the whole network and its layer rules, and the loss with K noise samples per example, for "
                      "image canaries", *COMMON_SCOPE],
        "not_exercised": ["worst-case gradients: input canaries are scored by their loss only (black-box, weak: "
                          "a leak can go unseen)", *_NEVER],
    },
}
INCLUSION_STREAM = 0x1C1D   # SeedSequence key of the canaries' inclusion bits


def inclusion_bits(canaries: int, seed: int) -> torch.Tensor:
    """Each canary in with probability 1/2, from a stream of its own: nothing else in the run (initialisation,
    sampling, noise) may be a function of them."""
    return torch.from_numpy(np.random.default_rng([seed, INCLUSION_STREAM]).random(canaries) < 0.5)


def audit_population(cfg: DictConfig, real_examples: int, canaries: int, seed: int):
    """The first ``real_examples`` real examples, the canaries' inclusion bits, images and labels."""
    real = build_dataset(cfg.data.name, cfg.data.path)
    if not 1 <= real_examples <= len(real):
        raise ValueError(f"--real-examples {real_examples}: the dataset has {len(real)}")
    real = Subset(real, range(real_examples))
    images, labels = random_images(canaries, tuple(real[0][0].shape), cfg.data.n_classes, seed + 1)
    return real, inclusion_bits(canaries, seed), images, labels


def check_arguments(mode: str, canaries: int, noise_multiplier: float | None, confidence: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if canaries < 4:
        raise ValueError(f"--canaries {canaries}: an audit needs at least 4 canaries (1000 or more for a useful bound)")
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"--noise-multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {confidence}")


def audit(cfg: DictConfig, *, canaries: int = 1000, mode: str = "gradient", noise_multiplier: float | None = None,
          real_examples: int = 1000, confidence: float = 0.95, score_draws: int = 32, seed: int = 0,
          canary_layer: str | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Train once with ``canaries`` canaries (each included with probability 1/2) and return the
    audit: the claimed epsilon, each estimator's lower bound at ``confidence``, and the scores."""
    check_arguments(mode, canaries, noise_multiplier, confidence)
    start = time.perf_counter()
    run = canary_run(cfg, canaries=canaries, mode=mode, noise_multiplier=noise_multiplier,
                     real_examples=real_examples, score_draws=score_draws, seed=seed, canary_layer=canary_layer,
                     device=device, progress=progress)
    return assemble(run.pop("scores"), run.pop("included"), cfg, confidence, mode=mode, real_examples=real_examples,
                    seed=seed, wall_s=time.perf_counter() - start, scope=SCOPE[mode], **run)


def canary_run(cfg: DictConfig, *, canaries: int, mode: str, noise_multiplier: float | None, real_examples: int,
               score_draws: int, seed: int, canary_layer: str | None = None, device: str | None = None,
               progress: bool = True, initial_state: dict | None = None, distinct_labels: bool = False) -> dict:
    """One training run with ``canaries`` canaries: their scores and inclusion bits, and the run's settings
    (``assemble``'s keyword arguments). ``initial_state``: the network's starting weights (the auditor's choice;
    default: the config's random initialisation); ``distinct_labels``: canary j gets label j mod n_classes."""
    from ..engine.api.privacy_engine import PrivacyEngine

    dev = resolve_device(device)
    real, included, images, labels = audit_population(cfg, real_examples, canaries, seed)
    if distinct_labels and cfg.data.n_classes:
        labels = torch.arange(canaries) % cfg.data.n_classes
    shape = tuple(images.shape[1:])
    dataset = AuditDataset(real, images, labels, included)

    dp, K = cfg.dp, cfg.loss.n_noise_samples
    # The rate is fixed before the canaries are drawn (from the expected dataset size), so it is public.
    plan = plan_privacy(n_examples=real_examples + canaries // 2, batch_size=cfg.train.batch_size,
                        n_epochs=cfg.train.n_epochs, epsilon=dp.epsilon, delta=dp.delta,
                        max_grad_norm=dp.max_grad_norm, accountant=dp.accountant, size_is_public=True)
    sigma = plan.noise_multiplier if noise_multiplier is None else float(noise_multiplier)

    torch.manual_seed(seed)
    denoiser = build_model(cfg)
    if initial_state is not None:
        denoiser.load_state_dict(initial_state)
    denoiser = denoiser.to(dev)
    layer = None
    if mode == "layer":
        canary_layer = canary_layer or default_layer(denoiser.model)
        layer = LayerCanaries(denoiser, canary_layer, canaries, plan.max_grad_norm, shape,
                              bool(cfg.data.n_classes), seed + 6)
    model = (CanaryDenoiser(denoiser, canaries, plan.max_grad_norm) if mode == "gradient" else denoiser).to(dev)
    holder = model if mode == "gradient" else layer     # what the canaries' rows are told to (None: input mode)
    optimizer = build_optimizer(cfg, model.parameters())
    loader = PoissonDataLoader(dataset, sample_rate=plan.sample_rate, steps=plan.steps_per_epoch,
                               generator=None if dp.secure_mode else torch.Generator().manual_seed(seed + 2),
                               secure_mode=dp.secure_mode)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=plan.max_grad_norm, noise_multiplicity=K, backend=dp.backend,
        noise_generator=None if dp.secure_mode else torch.Generator(device=dev).manual_seed(seed + 3),
        # the divisor from the expected dataset size too: len(dataset) * q would reveal how many canaries are in
        public_dataset_size=plan.n_examples)
    loss_fn = build_loss(**cfg.loss)
    loss_gen = torch.Generator(device=dev).manual_seed(seed + 4)
    labelled = bool(cfg.data.n_classes)
    physical = pass_size(cfg, dev)

    # input canaries: score = how much training lowered each canary's loss (the same noise draws before and
    # after), which removes most of the canary-to-canary spread of the loss itself
    initial_scores = (_loss_scores(private, cfg, images, labels, score_draws, seed, dev) if mode == "input" else 0.0)
    released = []     # white-box modes: each released update's component along each canary's direction
    steps = plan.budget_steps
    bar = tqdm(total=steps, disable=not progress, unit="step", desc=f"audit ({mode} canaries)")
    while engine.steps < steps:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer) as batches:
            for x, y, ids in batches:
                before = engine.steps
                x, ids = x.to(dev), ids.to(dev)
                y = y.to(dev) if labelled else None
                if holder is not None:
                    holder.set_canaries(ids.repeat_interleave(K))
                    holder.canary_term = None     # (a term left from the previous batch must never be used)
                per_example = loss_fn(private, x, y, generator=loss_gen)
                if holder is not None:
                    per_example = with_canary_terms(per_example, holder, ids, K)
                (per_example.sum() if len(x) == 0 else per_example.mean()).backward()
                optimizer.step()
                if engine.steps > before and mode != "input":
                    released.append(_released_components(mode, model, layer))
                optimizer.zero_grad(set_to_none=True)
                if engine.steps > before:
                    bar.update(1)
                    if engine.steps >= steps:
                        break
    bar.close()
    if layer is not None:
        layer.set_canaries(None)

    if mode == "input":
        scores = _loss_scores(private, cfg, images, labels, score_draws, seed, dev) - initial_scores
        statistic = {"statistic": "decrease of the denoising loss (initial minus final model)"}
    else:
        scores, statistic = white_box_scores(np.stack(released), sigma * plan.max_grad_norm / plan.divisor)
    if not np.isfinite(scores).all():
        raise FloatingPointError("some canary scores are not finite (the training diverged?): no audit")
    with quiet_accountant():
        spent = engine.get_epsilon(dp.delta) if sigma > 0 else math.inf
    return {"scores": scores, "included": included, "sigma": sigma, "plan": plan, "spent": spent,
            "steps": engine.steps, "backend": private.backend, "device": dev, "statistic": statistic,
            "canary_layer": None if layer is None else layer.layer_name}


def assemble(scores, included, cfg, confidence, *, mode, sigma, plan, spent, steps, backend, device, real_examples,
             statistic, canary_layer, seed, wall_s, scope) -> dict:
    """report.json's content: the claim, every estimator's bound (the best first), the run's settings, scores."""
    dp = cfg.dp
    included = np.asarray(included, dtype=bool)
    est = estimate_all(scores, included, dp.delta, confidence)
    steinke = est["estimators"]["eps_delta_one_run"]
    return {
        "mode": mode, "canaries": len(scores), "included": int(included.sum()), "real_examples": real_examples,
        "claimed_epsilon": float(dp.epsilon), "delta": float(dp.delta),
        "epsilon_lower_bound": est["epsilon_lower_bound"], "best_estimator": est["best"],
        "rigorous_epsilon_lower_bound": est["rigorous_epsilon_lower_bound"], "best_rigorous": est["best_rigorous"],
        "estimators": est["estimators"], "confidence": confidence,
        "ceiling": steinke["ceiling"], "max_ceiling": steinke["max_ceiling"], "guesses": steinke["guesses"],
        "candidates": steinke["candidates"], "significance_per_candidate": steinke["significance_per_candidate"],
        "noise_multiplier": sigma, "calibrated_noise_multiplier": plan.noise_multiplier,
        "accountant_epsilon_of_this_run": None if math.isinf(spent) else spent,
        # None without noise: no mu at all (json has no infinity)
        "accountant_mu_clt": dp_sgd_mu(plan.sample_rate, sigma, steps) if sigma > 0 else None,
        "sample_rate": plan.sample_rate, "steps": steps, "noise_multiplicity": cfg.loss.n_noise_samples,
        "max_grad_norm": plan.max_grad_norm, "backend": backend, "device": str(device),
        "canary_layer": canary_layer, "score": statistic,
        "config": {"data": cfg.data.name, "network": OmegaConf.to_container(cfg.model.network, resolve=True),
                   "batch_size": cfg.train.batch_size,
                   "n_epochs": cfg.train.n_epochs, "accountant": dp.accountant},
        "scores": [float(s) for s in scores], "included_mask": [bool(b) for b in included],
        "seed": seed, "wall_s": wall_s, "scope": scope,
    }


def _released_components(mode: str, model, layer) -> np.ndarray:
    """This step's released update along each canary's direction (white-box: p.grad after the step holds it)."""
    if mode == "gradient":   # canary j's direction is +e_j on theta
        return model.canary.weight.grad.detach().reshape(-1).double().cpu().numpy()
    return layer.project([p.grad for p in layer.params]).double().cpu().numpy()


@torch.no_grad()
def _loss_scores(private, cfg, images, labels, draws, seed, dev) -> np.ndarray:
    """Minus each input canary's denoising loss, averaged over ``draws`` fixed noise draws (higher: fitted)."""
    loss_fn = build_loss(**{**cfg.loss, "n_noise_samples": draws, "label_unconditioning_prob": 0.0})
    g = torch.Generator(device=dev).manual_seed(seed + 5)
    y_all = labels if cfg.data.n_classes else None
    out = []
    for start in range(0, len(images), 64):
        x = images[start:start + 64].to(dev)
        y = None if y_all is None else y_all[start:start + 64].to(dev)
        out.append(-loss_fn(private, x, y, generator=g).double().cpu())
    return torch.cat(out).numpy()
