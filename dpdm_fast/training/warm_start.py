"""The warm-up before DP-SGD (DP-FETA; FETA-Pro with ``warmup.rff.enabled``), in ``WORKDIR/warmup/``.

Stages, each done once per run (a resume skips what is on disk; a release is never drawn twice):
1. the central images (``dpdm_fast.warmup.central_images``), a DP release: ``central_images.npz`` / ``.png``;
1b. the RFF embedding (``dpdm_fast.warmup.rff``), a DP release: ``rff_embedding.npz``; the generator fitted to
   it and its images (post-processing): ``generator.pt``, ``generated_images.npz`` / ``.png``;
2. non-private training of the run's network and loss on the central images under strong augmentation
   (``warm_central.pt``), then on the generated images (``warm_generated.pt``): it reads released images only.
DP-SGD then starts from the last stage's EMA weights with a fresh optimizer and EMA. What the releases
cost is in the run's privacy plan (``planned_releases``) and its accountant's ledger.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..config import to_plain
from ..diffusion import build_loss
from ..imaging import save_grid
from ..warmup import Release, central_images, rff
from ..warmup.augment import Augment
from .ema import EMA

WARMUP_DIR = "warmup"
RECORD = "record.json"


def planned_releases(cfg: DictConfig) -> tuple[Release, ...]:
    """What the warm-up of ``cfg`` releases of the private data, in order (empty when it is off)."""
    if not cfg.warmup.enabled:
        return ()
    releases = [central_images.release_entry(cfg)]
    if cfg.warmup.rff.enabled:
        releases.append(rff.release_entry(cfg))
    return tuple(releases)


def warmup_started(workdir: str | Path) -> bool:
    return (Path(workdir) / WARMUP_DIR / RECORD).exists()


def _settings(cfg: DictConfig) -> dict:
    """What the warm-up's files depend on: its own section and the data / network / loss settings."""
    tree = to_plain(cfg)
    return {"warmup": tree["warmup"], "data": {k: v for k, v in tree["data"].items() if k != "path"},
            "model": tree["model"], "loss": tree["loss"], "secure_mode": tree["dp"]["secure_mode"]}


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _to_uint8_hwc(images01: torch.Tensor) -> np.ndarray:
    return (images01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class WarmStart:
    """Runs (or resumes) the warm-up stages of a run in ``workdir/warmup`` and loads the warm weights."""

    def __init__(self, cfg: DictConfig, workdir: str | Path, device: torch.device, progress: bool = True):
        self.cfg, self.dir, self.device, self.progress = cfg, Path(workdir) / WARMUP_DIR, device, progress
        self.secure = bool(cfg.dp.secure_mode)
        self.seeds = dict(zip(("central", "rff", "generator", "train_central", "train_generated"),
                              (int(s) for s in np.random.SeedSequence([cfg.warmup.seed, 7]).generate_state(5))))
        self.log: list[str] = []

    # -- bookkeeping ----------------------------------------------------------------------------
    def _check_record(self, data_check: str | None) -> None:
        """The first call writes what the stages depend on (the settings, and the run's keyed data check: an
        HMAC under the key in private/, safe to share); later calls (resumes) must match it exactly."""
        path, settings = self.dir / RECORD, _settings(self.cfg)
        settings["data_check"] = data_check
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("data_check") != data_check:
                raise ckpt.CheckpointError(
                    f"{self.dir}: the training data at {self.cfg.data.path} is not the data whose statistics this "
                    "warm-up released: the run cannot continue on other data; start a new run")
            if saved != settings:
                raise ckpt.CheckpointError(
                    f"{self.dir} holds the warm-up of a run with other settings: its releases were made for those "
                    "and cannot be reused or drawn again; choose another --workdir")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{RECORD}.tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
        tmp.replace(path)

    def _generator(self, name: str) -> torch.Generator:
        gen = torch.Generator()
        seed = int.from_bytes(os.urandom(8), "little") if self.secure else self.seeds[name]
        return gen.manual_seed(seed)

    # -- stages ---------------------------------------------------------------------------------
    def central(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: the released central images (drawn now, or read back)."""
        path = self.dir / "central_images.npz"
        if not path.exists():
            images, labels = central_images.release_central_images(dataset, self.cfg, self._generator("central"))
            _save_npz(path, images=images.numpy(), labels=labels.numpy())
            rounds = self.cfg.warmup.central.rounds
            save_grid(_to_uint8_hwc(images), path.with_suffix(".png"), nrow=len(images) // rounds, scale=2)
            self.log.append(f"released {len(images)} central images: {path} (grid: {path.with_suffix('.png')})")
        with np.load(path) as f:
            return torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])

    def generated(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1b: the RFF release, the generator fitted to it and its images (each step once)."""
        r, data = self.cfg.warmup.rff, self.cfg.data
        release_path, gen_path, images_path = (self.dir / "rff_embedding.npz", self.dir / "generator.pt",
                                               self.dir / "generated_images.npz")
        channels, res = int(data.num_channels), int(data.resolution)
        w = rff.frequencies_for(self.cfg, channels * res * res)
        if not release_path.exists():
            images, labels = central_images.private_images(dataset)
            n_groups = int(data.n_classes) if data.n_classes else 1
            released = rff.noisy_class_embedding(images, labels if data.n_classes else None, n_groups, w,
                                                 r.noise_multiplier, self._generator("rff"))
            _save_npz(release_path, embedding=released.numpy())
            self.log.append(f"released the class-conditional RFF embedding ({tuple(released.shape)}): {release_path}")
        with np.load(release_path) as f:
            released = torch.from_numpy(f["embedding"])
        if not images_path.exists():
            gen = rff.train_generator(released, w, channels=channels, resolution=res, steps=r.generator_steps,
                                      batch_size=r.generator_batch_size, lr=r.generator_lr,
                                      seed=self.seeds["generator"], progress=self.progress)
            ckpt.save_atomic({"generator": gen.state_dict()}, gen_path)
            images, labels = rff.generate_images(gen, released, r.n_images, seed=self.seeds["generator"])
            _save_npz(images_path, images=images.numpy(), labels=labels.numpy())
            save_grid(_to_uint8_hwc(images[:100]), images_path.with_suffix(".png"), nrow=10, scale=2)
            self.log.append(f"generated {len(images)} images from the RFF release: {images_path}")
        with np.load(images_path) as f:
            return torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])

    def train_on(self, model: torch.nn.Module, name: str, images: torch.Tensor, labels: torch.Tensor,
                 steps: int) -> None:
        """Stage 2: non-private training of ``model`` on released images; its EMA weights end up in ``model``
        and in ``warm_{name}.pt`` (read back on a resume instead of training again)."""
        path = self.dir / f"warm_{name}.pt"
        if not path.exists():
            start = time.perf_counter()
            ema = pretrain(model, self.cfg, images, labels, steps=steps, seed=self.seeds[f"train_{name}"],
                           device=self.device, progress=self.progress, desc=f"warm-up: {name}")
            ckpt.save_atomic({"ema": {k: v.cpu() for k, v in ema.state_dict().items()}, "steps": steps}, path)
            self.log.append(f"warm-up training: {steps} steps on {len(images)} {name} images in "
                            f"{time.perf_counter() - start:.0f} s -> {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.model.load_state_dict(state["ema"])

    def run(self, dataset, model: torch.nn.Module, data_check: str | None = None) -> list[str]:
        """All stages in order; ``model`` (the run's denoiser) ends with the warm EMA weights. Returns what was
        done now (empty on a resume that found everything on disk). ``data_check``: the run's keyed check of
        its data, recorded with the first stage and compared on a resume."""
        self._check_record(data_check)
        t = self.cfg.warmup.train
        images, labels = self.central(dataset)
        if t.central_steps:
            self.train_on(model, "central", images, labels, t.central_steps)
        if self.cfg.warmup.rff.enabled:
            images, labels = self.generated(dataset)
            if t.generated_steps:
                self.train_on(model, "generated", images, labels, t.generated_steps)
        return self.log


def pretrain(model: torch.nn.Module, cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, *, steps: int,
             seed: int, device: torch.device, progress: bool = False, desc: str = "warm-up") -> EMA:
    """Non-private training of the denoiser on images in [0, 1] (with their labels): random batches with
    replacement, each image augmented (kornia RandAugment), the run's loss with one noise sample per image and
    label dropout, Adam at ``warmup.train.lr``; returns the EMA (rate ``model.ema_rate``, score_sde warm-up)."""
    t = cfg.warmup.train
    loss_settings = dict(cfg.loss)
    loss_settings["n_noise_samples"] = 1
    loss_fn = build_loss(**loss_settings)
    augment = Augment(t.augment_ops, t.augment_magnitude, channels=images.shape[1])
    labelled = bool(cfg.data.n_classes)
    torch.manual_seed(seed)
    picks = torch.Generator().manual_seed(seed)
    loss_gen = torch.Generator(device=device).manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    ema = EMA(model.model, cfg.model.ema_rate)
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(len(images), (t.batch_size,), generator=picks)
        x = (augment(images[idx].float()) * 2 - 1).to(device)
        y = labels[idx].to(device) if labelled else None
        loss = loss_fn(model, x, y, generator=loss_gen).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model.model)
    return ema
