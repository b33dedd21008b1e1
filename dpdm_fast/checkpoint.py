"""Training checkpoints: written atomically, read with clear errors, checked against the run.

A checkpoint is a plain dict that ``torch.load(path)`` reads (``weights_only=True`` works): the
step at its top-level key ``step``, the network (``model``) and EMA (``ema``) state_dicts with the
published network's keys, the optimizer, the accountant's ledger, every random generator's state,
the resolved config, the package version and a keyed data check (the engine's autotune choices,
timed on private batch sizes, are kept beside it in the workdir's ``private/``).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

FORMAT = "dpdm_fast.train/1"

# Config keys that may change between a run and its resumption: where things are written and how
# often, how samples are drawn, how data is read, how the engine computes the same update (backend,
# path choice: the same mathematics, so only rounding can differ). Everything else decides the trained
# model or its privacy, and must match; physical batching (dp.max_physical_batch_size, dp.n_splits)
# too, because the loss draws its label dropout, noise levels and diffusion noise per physical batch
# (with dp.max_physical_batch_size: auto, the resumed run reuses the pass size the checkpoint records, so
# dp.memory_fraction, which only informs a new probe, may change).
RESUMABLE_CHANGES = ("setup.", "sampler.", "data.path", "data.dataloader_params", "data.fid_stats",
                     "dp.backend", "dp.autotune", "dp.memory_fraction",
                     "train.log_freq", "train.snapshot_freq", "train.snapshot_threshold", "train.save_freq",
                     "train.save_threshold", "train.fid_freq", "train.fid_samples", "train.fid_threshold")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read, or does not belong to this run."""


def save_atomic(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a crash at any moment leaves either the previous file or the new
    one, never a partial one: write a temporary file beside it, fsync it, rename it over ``path``, fsync
    the folder. On failure (disk full, no permission) the temporary file is removed and the previous
    checkpoint stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        kept = f"; the previous checkpoint {path} is unchanged" if path.exists() else ""
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}{kept}. Free disk space or "
                              "fix the folder's permissions, then resume with --resume") from e
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:   # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file, turning every way it can be broken into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {str(e).splitlines()[0]}). "
                              "Restore it from a copy of the same step (a resume refuses a checkpoint older than "
                              "the last released step, whose steps would be drawn again), or start a new run in "
                              "another workdir") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ between two resolved configs and that a resumed run may not change."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, '<absent>')!r} in the checkpoint, {b.get(k, '<absent>')!r} now" for k in keys
            if a.get(k) != b.get(k) and not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)]


def check_training_checkpoint(state: Mapping[str, Any], path: Path, config: Mapping[str, Any]) -> None:
    """Refuse a checkpoint that is not ours or not of this run's config (network, data, privacy, schedule)."""
    missing = [k for k in ("format", "step", "config", "model", "ema", "optimizer", "privacy", "rng") if k not in state]
    if missing or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dpdm_fast training checkpoint (missing {missing or 'format tag'}); "
                              "to sample from a published DPDM checkpoint use `dpdm-fast sample` instead")
    diffs = config_differences(state["config"], config)
    if diffs:
        raise CheckpointError(f"{path} belongs to a different run; its config differs in:\n  " + "\n  ".join(diffs)
                              + "\nResume with the same config (the checkpoint's resolved config is under its "
                              "'config' key), or choose another --workdir for a new run")


def network_state(checkpoint: Mapping[str, Any], network: torch.nn.Module, use_ema: bool = True) -> dict:
    """The network's weights from a checkpoint of ours or of the original DPDM release.

    Ours: ``model`` / ``ema`` are state_dicts with the network's own keys. DPDM's: ``model`` is the
    state_dict of DDP(denoiser) (keys ``module.model.all_modules...``) and ``ema`` is score_sde's
    ExponentialMovingAverage state (``shadow_params``: the trainable parameters, in the network's
    parameter order). ``use_ema=False`` takes the raw weights.
    """
    key = "ema" if use_ema else "model"
    if key not in checkpoint:
        raise CheckpointError(f"the checkpoint has no {key!r} entry (keys: {sorted(checkpoint)})")
    entry = checkpoint[key]
    if isinstance(entry, Mapping) and "shadow_params" in entry:
        params = [p for p in network.parameters() if p.requires_grad]
        shadow = list(entry["shadow_params"])
        if len(shadow) != len(params):
            raise CheckpointError(f"the checkpoint's EMA holds {len(shadow)} tensors, this network has {len(params)} "
                                  "parameters: it is a checkpoint of another network (check model.network.*)")
        state = network.state_dict()
        by_id = {id(p): name for name, p in network.named_parameters()}
        for p, value in zip(params, shadow):
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"EMA tensor of shape {tuple(value.shape)} where {by_id[id(p)]} has "
                                      f"{tuple(p.shape)}: a checkpoint of another network")
            state[by_id[id(p)]] = value
        return state
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"the checkpoint's {key!r} entry is a {type(entry).__name__}, not a state_dict")
    return {_strip(name): value for name, value in entry.items()}


def _strip(name: str) -> str:
    """Network keys from wrapped ones: DDP's 'module.', the denoiser's 'model.', Opacus's '_module.'."""
    for prefix in ("_module.", "module.", "model."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def load_network_weights(network: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """load_state_dict(strict=True), with an error that says which config the checkpoint needs."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError("the checkpoint's weights do not fit this network (a checkpoint of another "
                              f"model.network config?): {str(e).splitlines()[0]} ...") from None
