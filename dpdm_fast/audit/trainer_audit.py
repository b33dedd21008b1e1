"""`dpdm-fast audit --trainer`: the real ``Trainer`` audited end to end.

The canaries are ordinary examples of the training set handed to ``Trainer`` (layer canaries: their
gradient lies in one of the network's own layers, see ``layer_canaries.py``), and the run is the
trainer's: its privacy plan and ledger, the warm-up stages when the config has them, EMA, checkpoints,
snapshot grids, and a forced interruption in the middle (``--max-steps``, as a run stopped after a
checkpoint) followed by ``--resume`` in a new Trainer. Every released update is read after its step
(the white-box threat model) in release order, so noise or Poisson draws that a resume repeats are in
what the auditor sees; ``scores.py`` turns repeated noise into a near-noiseless statistic.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from ..generate import build_model
from ..training.loop import Trainer
from ..training.privacy_plan import plan_privacy
from ..training.warm_start import planned_releases
from .canaries import with_canary_terms
from .layer_canaries import LayerCanaries, default_layer
from .run import COMMON_SCOPE, SCOPE, assemble, audit_population, check_arguments
from .scores import white_box_scores

TRAINER_SCOPE = {
    "exercised": [
        "the Trainer itself: its privacy plan and ledger, and a forced interruption (a stop after a checkpoint) "
        "followed by --resume in a new Trainer (in the same process): noise that the resume repeats shows in the "
        "released updates the auditor reads",
        "EMA, checkpoints and snapshot grids run as in training (the scores read only the DP-SGD updates, so a bug in "
        "them shows only through what those updates release)",
        "the warm-up stages when the config enables them (they run on the canaries too, and their eps is part of "
        "the claim; the scores read only the DP-SGD updates)",
        *SCOPE["layer"]["exercised"][:1], *COMMON_SCOPE],
    "not_exercised": ["the rules of the network's other layers (audit another layer with --canary-layer)",
                      "repeated Poisson draws after a resume (the scores have no statistic for them)",
                      "state that survives a resume only inside one process (the two Trainers share it)",
                      "the other backends than the one named", "multi-process (distributed) training",
                      "the warm-up's own releases as a channel for the scores (the central images are not scored)"],
}


class CanaryTrainingSet(Dataset):
    """The real examples (a Subset of an array-backed dataset such as MNIST) followed by the included canaries,
    as ordinary (image, label) items; the trainer tells the canaries' rows by their images (random +-1
    patterns, kept in a lookup)."""

    def __init__(self, real: Dataset, canary_images: torch.Tensor, canary_labels: torch.Tensor, included: torch.Tensor):
        self.real, self.images, self.labels = real, canary_images, canary_labels
        self.ids = included.nonzero().reshape(-1).tolist()
        self.lookup = {canary_images[j].numpy().tobytes(): j for j in self.ids}

    def __len__(self) -> int:
        return len(self.real) + len(self.ids)

    def __getitem__(self, index: int):
        if index < len(self.real):
            return self.real[index]
        j = self.ids[index - len(self.real)]
        return self.images[j], int(self.labels[j])

    # the warm-up's stage 1 reads the whole set as arrays (uint8 images, labels), as it reads MNIST's
    @property
    def data(self) -> np.ndarray:
        base, index = self.real.dataset, self.real.indices
        real = np.asarray(base.data)[index]
        canaries = ((self.images[self.ids] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        canaries = canaries.numpy()
        return np.concatenate([real, canaries[..., 0] if real.ndim == 3 else canaries])

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.real.dataset.targets)[self.real.indices],
                               self.labels[self.ids].numpy()])

    def canary_ids(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) canary index of each row of a batch, -1 for real examples."""
        return torch.tensor([self.lookup.get(row.numpy().tobytes(), -1) for row in x.detach().cpu().float()],
                            dtype=torch.long)


class AuditedTrainer(Trainer):
    """``Trainer`` on a training set with canaries: each canary's loss is its canary term, and each step's
    released update is recorded along the canaries' directions."""

    def __init__(self, cfg: DictConfig, workdir, *, training_set: CanaryTrainingSet, canaries: LayerCanaries,
                 released: list, **kwargs):
        self._training_set, self._canaries, self._released_rows = training_set, canaries, released
        super().__init__(cfg, workdir, **kwargs)
        canaries.attach(self.network)

    def _training_dataset(self):
        return self._training_set

    def _physical_batch(self, x, y, stats) -> None:
        K = self.cfg.loss.n_noise_samples
        ids = self._training_set.canary_ids(x).to(self.device)
        x = x.to(self.device)
        y = y.to(self.device) if self.labelled else None
        self._canaries.set_canaries(ids.repeat_interleave(K))
        self._canaries.canary_term = None
        try:
            losses = with_canary_terms(self.loss_fn(self.private, x, y, generator=self.loss_gen), self._canaries, ids, K)
            (losses.sum() if len(x) == 0 else losses.mean()).backward()
        finally:
            self._canaries.set_canaries(None)
        if len(x):
            norms = self.private.collector.last_norms
            stats.add_batch(float(losses.detach().sum()), len(x), float(norms.sum()),
                            int((norms > self.plan.max_grad_norm).sum()))

    def _released(self) -> None:
        self._released_rows.append(self._canaries.project([p.grad for p in self._canaries.params]).double().cpu().numpy())


def planned_steps(cfg: DictConfig) -> int:
    """The DP-SGD steps the Trainer's plan will run for this config."""
    dp = cfg.dp
    return plan_privacy(n_examples=cfg.data.public_size, batch_size=cfg.train.batch_size, n_epochs=cfg.train.n_epochs,
                        epsilon=dp.epsilon, delta=dp.delta, max_grad_norm=dp.max_grad_norm, accountant=dp.accountant,
                        size_is_public=True, releases=planned_releases(cfg)).budget_steps


def audit_trainer(cfg: DictConfig, workdir: str | Path, *, canaries: int = 1000, real_examples: int = 1000,
                  confidence: float = 0.95, seed: int = 0, canary_layer: str | None = None, interrupt_at: float = 0.5,
                  device: str | None = None, progress: bool = True) -> dict:
    """Train ``cfg`` with the Trainer in ``workdir`` (new), interrupted after ``interrupt_at`` of its steps and
    resumed, with ``canaries`` layer canaries among ``real_examples`` real ones; return the audit."""
    check_arguments("layer", canaries, None, confidence)
    if not 0 < interrupt_at < 1:
        raise ValueError(f"interrupt_at must be in (0, 1), got {interrupt_at}")
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        raise FileExistsError(f"{workdir} is not empty: the audited run needs a new workdir")
    start = time.perf_counter()
    real, included, images, labels = audit_population(cfg, real_examples, canaries, seed)
    shape = tuple(images.shape[1:])
    training_set = CanaryTrainingSet(real, images, labels, included)
    # the expected size is public: q, the steps and the divisor do not depend on how many canaries are in
    cfg = OmegaConf.merge(cfg, {"data": {"public_size": real_examples + canaries // 2}})

    torch.manual_seed(seed)
    reference = build_model(cfg)   # the directions are computed on a copy (they do not depend on its weights)
    layer_name = canary_layer or default_layer(reference.model)
    layer = LayerCanaries(reference, layer_name, canaries, float(cfg.dp.max_grad_norm), shape,
                          bool(cfg.data.n_classes), seed + 6)
    released: list = []
    common = dict(training_set=training_set, canaries=layer, released=released, device=device, progress=progress)
    budget = planned_steps(cfg)
    stop = max(1, min(budget - 1, round(budget * interrupt_at)))
    try:
        first = AuditedTrainer(cfg, workdir, max_steps=stop, **common)
        first.run()
        result = AuditedTrainer(cfg, workdir, resume=True, **common).run()
    finally:
        layer.remove()

    plan = first.plan
    scores, statistic = white_box_scores(np.stack(released), plan.noise_multiplier * plan.max_grad_norm / plan.divisor)
    if not np.isfinite(scores).all():
        raise FloatingPointError("some canary scores are not finite (the training diverged?): no audit")
    report = assemble(scores, included.numpy(), cfg, confidence, mode="trainer", sigma=plan.noise_multiplier,
                      plan=plan, spent=result.epsilon, steps=result.step, backend=first.private.backend,
                      device=first.device, real_examples=real_examples, statistic=statistic, canary_layer=layer_name,
                      seed=seed, wall_s=time.perf_counter() - start, scope=TRAINER_SCOPE)
    report["claimed_epsilon"] = float(cfg.dp.epsilon)
    report["interruption"] = {"stopped_after_step": stop, "resumed_to_step": result.step,
                              "releases_read": len(released)}
    report["accountant_epsilon_of_this_run"] = None if math.isinf(result.epsilon) else result.epsilon
    return report
