"""Drawing samples from a trained model: load a checkpoint (ours or DPDM's), run a sampler in batches,
write an .npz of uint8 images and int64 labels plus a grid PNG."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .config import apply_overrides, config_from_dict, load_config
from .diffusion import build_denoiser, sample
from .imaging import save_grid, to_uint8
from .models import build_network
from .checkpoint import CheckpointError, load, load_network_weights, network_state

UNLABELLED = -1   # the label stored for samples of an unconditional model


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The denoiser (preconditioning around the network) a config describes."""
    return build_denoiser(cfg.model.denoiser_name, build_network(cfg.model.network))


def no_label_token(cfg: DictConfig) -> int | None:
    """The label that means 'no label' (classifier-free guidance), when the network has one."""
    net = cfg.model.network
    return int(net.label_dim) if net.label_dim and net.use_cfg else None


def load_for_sampling(checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (),
                      use_ema: bool = True, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DictConfig]:
    """The denoiser with the checkpoint's (EMA) weights, in eval mode, and its config.

    Our checkpoints carry their config; a checkpoint of the original DPDM release does not, so pass
    the config it was trained with (e.g. configs/mnist_28/train_eps_10.0.yaml).
    """
    state = load(checkpoint, map_location="cpu")
    if config is not None:
        cfg = load_config(config, overrides)
    elif "config" in state:
        cfg = apply_overrides(config_from_dict(state["config"], f"{checkpoint} (its saved config)"), overrides)
    else:
        raise CheckpointError(f"{checkpoint} has no saved config (a checkpoint of the original DPDM release?): pass "
                              "--config with the config it was trained with, e.g. configs/mnist_28/train_eps_10.0.yaml")
    model = build_model(cfg)
    load_network_weights(model.model, network_state(state, model.model, use_ema=use_ema))
    return model.to(device).eval(), cfg


LABEL_MODES = ("random", "balanced")


def sample_labels(n: int, spec: str | int | None, n_classes: int | None, seed: int = 0) -> torch.Tensor | None:
    """Labels for n samples. 'random' (the default, as DPDM's released sampling code: each label uniform over
    the classes, drawn from a generator seeded with ``seed``), 'balanced' (cycles through the classes: n /
    n_classes each; 'all' is its older name), or a class index k (every sample of class k)."""
    if not n_classes:
        if spec not in (None, "random", "balanced", "all"):
            raise ValueError(f"--labels {spec}: this model is unconditional (no classes)")
        return None
    if spec in (None, "random"):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))
        return torch.randint(n_classes, (n,), generator=gen)
    if spec in ("balanced", "all"):
        return torch.arange(n) % n_classes
    try:
        k = int(spec)
    except ValueError:
        raise ValueError(f"--labels must be 'random', 'balanced' or a class index, got {spec!r}") from None
    if not 0 <= k < n_classes:
        raise ValueError(f"--labels {k}: classes are 0..{n_classes - 1}")
    return torch.full((n,), k, dtype=torch.long)


def label_mode(spec: str | int | None, n_classes: int | None) -> str:
    """How the labels of ``sample_labels(spec)`` were chosen, as recorded beside the samples."""
    if not n_classes:
        return "unconditional"
    if spec in (None, "random"):
        return "random"
    if spec in ("balanced", "all"):
        return "balanced"
    return f"class {int(spec)}"


def generate(model: torch.nn.Module, cfg: DictConfig, n: int, labels: torch.Tensor | None, *, seed: int = 0,
             batch_size: int = 500, sampler_options: dict | None = None, device: str | torch.device = "cpu",
             progress: bool = True, quantize: str = "truncate") -> np.ndarray:
    """n images as (n, H, W, C) uint8 (``quantize``: see ``imaging.to_uint8``; 'truncate' as DPDM's release).
    Batch b starts from noise of a generator seeded with (seed, b), so the same seed and batch size give the
    same images on the same device and software."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch size >= 1, got {n}, {batch_size}")
    options = dict(sampler_options if sampler_options is not None else sampler_settings(cfg))
    guid_scale = options.pop("guid_scale", 0.0)
    shape = (cfg.data.num_channels, cfg.data.resolution, cfg.data.resolution)
    out = np.zeros((n, shape[1], shape[2], shape[0]), dtype=np.uint8)
    starts = range(0, n, batch_size)
    for b, start in enumerate(tqdm(starts, disable=not progress, unit="batch", desc="sampling", file=sys.stderr)):
        size = min(batch_size, n - start)
        gen = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, b]).generate_state(1)[0]))
        noise = torch.randn((size, *shape), generator=gen, device=device)
        y = None if labels is None else labels[start:start + size].to(device)
        images = sample(model, noise, y, guid_scale=guid_scale, no_label=no_label_token(cfg), generator=gen, **options)
        out[start:start + size] = to_uint8(images, quantize)
    return out


def sampler_settings(cfg: DictConfig) -> dict:
    """The sampler options of a config's ``sampler`` section (type, steps, levels, churn, guidance)."""
    s = cfg.sampler
    options = dict(type=s.type, num_steps=s.num_steps, tmin=s.tmin, tmax=s.tmax, rho=s.rho, guid_scale=s.guid_scale)
    if s.type == "ddim":
        options["stochastic"] = s.stochastic
    else:
        options.update(s_churn=s.s_churn, s_min=s.s_min, s_max=s.s_max, s_noise=s.s_noise)
    return options


def write_samples(images: np.ndarray, labels: torch.Tensor | None, out: str | Path, grid_size: int = 100,
                  options: dict[str, str] | None = None) -> tuple[Path, Path]:
    """``out`` (.npz with 'images' uint8 N x H x W x C and 'labels' int64 N, plus one string array per entry
    of ``options``, e.g. label_mode and quantize, which ``dpdm-fast eval`` reports) and a grid PNG beside it."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must name a .npz file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    label_array = (np.full(len(images), UNLABELLED, dtype=np.int64) if labels is None
                   else labels.numpy().astype(np.int64))
    tmp = out.with_name(f".{out.name}.tmp.npz")
    extra = {k: np.array(str(v)) for k, v in (options or {}).items()}
    if {"images", "labels"} & set(extra):
        raise ValueError("options may not be named 'images' or 'labels'")
    np.savez_compressed(tmp, images=images, labels=label_array, **extra)
    tmp.replace(out)
    shown = images[:grid_size]
    png = save_grid(shown, out.with_suffix(".png"), nrow=int(np.ceil(np.sqrt(len(shown)))), scale=2)
    return out, png
