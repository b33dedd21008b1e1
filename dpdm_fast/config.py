"""Run configuration: DPDM's YAML layout, validated against a typed schema (omegaconf).

A config written for the original DPDM code loads unchanged; a key that the schema does not
know, in a file or a ``key=value`` override, is an error that lists the valid keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


@dataclass
class SetupConfig:
    runner: str = "train_dpdm_base"
    n_gpus_per_node: int = 1
    n_nodes: int = 1
    node_rank: int = 0
    master_address: str = "127.0.0.1"
    master_port: int = 6020
    omp_n_threads: int = 2
    workdir: str = "runs/default"


@dataclass
class DataLoaderParams:
    num_workers: int = 1
    pin_memory: bool = False


@dataclass
class DataConfig:
    path: Optional[str] = None
    name: str = "mnist_28"
    # A public number of training examples (e.g. the published dataset's size): the sample rate, the number
    # of steps and the update's divisor are then computed from it, not from the realised (private) size.
    # null: the realised size is used and treated as public (as Opacus does).
    public_size: Optional[int] = None
    num_channels: int = 1
    resolution: int = 28
    n_classes: Optional[int] = 10
    fid_stats: list[str] = field(default_factory=list)
    one_hot: bool = False
    dataloader_params: DataLoaderParams = field(default_factory=DataLoaderParams)


@dataclass
class NetworkConfig:
    """Arguments of :class:`dpdm_fast.models.NCSNpp` (DPDM's defaults)."""
    image_size: int = 28
    attn_resolutions: list[int] = field(default_factory=lambda: [7])
    num_in_channels: int = 1
    num_out_channels: int = 1
    label_dim: int = 10
    use_cfg: bool = True
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    nf: int = 32
    num_res_blocks: int = 2
    dropout: float = 0.0
    resamp_with_conv: bool = True
    fir: bool = False
    fir_kernel: list[int] = field(default_factory=lambda: [1, 3, 3, 1])
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    embedding_type: str = "positional"
    init_scale: float = 0.0
    combine_method: str = "sum"
    fourier_scale: float = 16.0
    nonlinearity: str = "swish"


@dataclass
class ModelConfig:
    denoiser_name: str = "edm"
    denoiser_network: str = "song"
    ema_rate: float = 0.999
    network: NetworkConfig = field(default_factory=NetworkConfig)


@dataclass
class OptimParams:
    lr: float = 3e-4
    weight_decay: float = 0.0


@dataclass
class OptimConfig:
    optimizer: str = "Adam"
    params: OptimParams = field(default_factory=OptimParams)


@dataclass
class SamplerConfig:
    type: str = "ddim"
    stochastic: bool = False
    num_steps: int = 50
    tmin: float = 0.002
    tmax: float = 80.0
    rho: float = 7.0
    guid_scale: float = 0.0
    snapshot_batch_size: int = 64
    fid_batch_size: int = 64
    labels: Optional[Any] = None
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 4096
    n_epochs: int = 300
    log_freq: int = 100
    snapshot_freq: int = 1000
    snapshot_threshold: int = 1
    save_freq: int = 100000
    save_threshold: int = 1
    fid_freq: int = 10000
    fid_samples: int = 5000
    fid_threshold: int = 1


@dataclass
class LossConfig:
    version: str = "edm"
    n_noise_samples: int = 32
    n_classes: Optional[int] = None
    label_unconditioning_prob: float = 0.1
    # EDM
    p_mean: float = -1.2
    p_std: float = 1.2
    # v-prediction
    logsnr_min: float = -9.0
    logsnr_max: float = 13.0
    # VE
    sigma_min: float = 0.02
    sigma_max: float = 100.0
    # VP
    beta_min: float = 0.1
    beta_d: float = 19.9
    eps_t: float = 1e-5


@dataclass
class DPConfig:
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon: float = 10.0
    # examples per physical batch, or "auto": the largest pass that fits in memory_fraction of the free memory,
    # measured by a probe step of the configured network (dpdm-fast info CONFIG shows the plan)
    max_physical_batch_size: Union[int, str] = 8192
    n_splits: int = 4   # each physical batch runs as n_splits passes (memory: max_physical_batch_size / n_splits examples)
    memory_fraction: float = 0.8   # the share of the free memory an auto pass may use (a numeric one: warned above it)
    accountant: str = "rdp"
    secure_mode: bool = False
    # auto (Triton kernels on a GPU, torch on the CPU) | torch | triton | cuda: see the README's Backends
    backend: str = "auto"
    # false: every per-group gradient takes its reference path instead of the fastest measured one, so
    # two runs with the same seed agree bitwise (slower where another path would have won)
    autotune: bool = True


@dataclass
class CentralImagesConfig:
    """Stage 1 (DP-FETA): per-class sums of down-sampled images of Poisson batches, noised (a DP release)."""
    rounds: int = 5                 # T: one image per class per round
    sample_rate: float = 0.1        # q_c: each round's Poisson rate over the private set
    downsample: float = 0.5         # ds: images are down-sampled by this factor before summing (0.5: 28 -> 14)
    noise_multiplier: float = 5.0   # sigma_c: noise std over the L2 bound of one down-sampled image
    median_blur: int = 0            # post-processing: kernel size of a median blur (0: none; odd sizes)
    sharpen: float = 0.0            # post-processing: kornia sharpness factor (0: none)


@dataclass
class RFFConfig:
    """Stage 1b (FETA-Pro): one release of the class-conditional mean random-Fourier-feature embedding,
    and a small generator trained (non-privately) to match it."""
    enabled: bool = False
    n_features: int = 10000         # d_rff (cos and sin of n_features / 2 frequencies)
    bandwidth: float = 10.0         # Gaussian kernel length scale on [0, 1] pixels
    noise_multiplier: float = 5.0   # Gaussian noise std over the embedding's add/remove sensitivity (1)
    generator_steps: int = 2000
    generator_batch_size: int = 500
    generator_lr: float = 1e-3
    n_images: int = 60000           # images drawn from the generator for the warm-up


@dataclass
class WarmupTrainConfig:
    """Non-private warm-up training on the released images (post-processing: no privacy cost)."""
    central_steps: int = 2000
    generated_steps: int = 0        # steps on the stage-1b images (after the central images)
    batch_size: int = 50
    lr: float = 3e-4
    augment_ops: int = 2            # kornia RandAugment: ops per image
    augment_magnitude: float = 10.0  # kornia RandAugment magnitude (of 30)


@dataclass
class WarmupConfig:
    """DP-FETA / FETA-Pro warm-up before DP-SGD; off by default (the published DPDM configs are as released)."""
    enabled: bool = False
    seed: int = 0
    central: CentralImagesConfig = field(default_factory=CentralImagesConfig)
    rff: RFFConfig = field(default_factory=RFFConfig)
    train: WarmupTrainConfig = field(default_factory=WarmupTrainConfig)


@dataclass
class Config:
    setup: SetupConfig = field(default_factory=SetupConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a value of the wrong type."""


def _valid_keys(schema: DictConfig, dotted: str) -> tuple[str, list[str]]:
    """The deepest existing section on the path of ``dotted`` and its valid keys."""
    node, prefix = schema, ""
    for part in dotted.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node and isinstance(node[part], DictConfig):
            node, prefix = node[part], f"{prefix}{part}."
        else:
            break
    return prefix.rstrip(".") or "<top level>", sorted(node.keys())


def _merge(schema: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = e.full_key or str(e)
        section, keys = _valid_keys(schema, key)
        raise ConfigError(f"{origin}: unknown config key {key!r}. Valid keys in {section}: {', '.join(keys)}") from None
    except ValidationError as e:
        raise ConfigError(f"{origin}: bad value for {e.full_key!r}: {e.msg.splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML config (DPDM layout) and apply ``key.sub=value`` overrides, strictly."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``key.sub=value`` overrides on a loaded config, each checked against the schema."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    return cfg


# Every count and frequency of a config, with the smallest value it may take (checked before anything runs).
_COUNTS = {
    "data.public_size": 1, "data.n_classes": 0, "data.num_channels": 1, "data.resolution": 1,
    "data.dataloader_params.num_workers": 0,
    "model.network.nf": 1, "model.network.num_res_blocks": 1, "model.network.image_size": 1,
    "sampler.num_steps": 2, "sampler.snapshot_batch_size": 1, "sampler.fid_batch_size": 1,
    "train.seed": 0, "train.batch_size": 1, "train.n_epochs": 1, "train.log_freq": 1, "train.snapshot_freq": 1,
    "train.snapshot_threshold": 0, "train.save_freq": 1, "train.save_threshold": 0, "train.fid_freq": 1,
    "train.fid_samples": 1, "train.fid_threshold": 0,
    "loss.n_noise_samples": 1, "dp.max_physical_batch_size": 1, "dp.n_splits": 1,
    "warmup.seed": 0, "warmup.central.rounds": 1, "warmup.central.median_blur": 0, "warmup.rff.n_features": 2,
    "warmup.rff.generator_steps": 0, "warmup.rff.generator_batch_size": 1, "warmup.rff.n_images": 1,
    "warmup.train.central_steps": 0, "warmup.train.generated_steps": 0, "warmup.train.batch_size": 1,
    "warmup.train.augment_ops": 0,
}

# Every rate and scale of the warm-up: (lowest, highest, whether the lowest is allowed).
_WARMUP_RANGES = {
    "warmup.central.sample_rate": (0.0, 1.0, False), "warmup.central.downsample": (0.0, 1.0, False),
    "warmup.central.noise_multiplier": (0.0, float("inf"), False), "warmup.central.sharpen": (0.0, float("inf"), True),
    "warmup.rff.bandwidth": (0.0, float("inf"), False), "warmup.rff.noise_multiplier": (0.0, float("inf"), False),
    "warmup.rff.generator_lr": (0.0, float("inf"), False), "warmup.train.lr": (0.0, float("inf"), False),
    "warmup.train.augment_magnitude": (0.0, 30.0, True),
}


def validate_counts(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming every count or frequency below its minimum (a zero frequency would
    otherwise stop a run with a bare ZeroDivisionError after its first private step), and an EMA rate
    outside [0, 1)."""
    problems = []
    for key, minimum in _COUNTS.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in ("data.public_size", "data.n_classes"):
            continue   # optional
        if key == "dp.max_physical_batch_size" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{key}={value!r} (must be an integer >= {minimum}"
                            + (' or "auto")' if key == "dp.max_physical_batch_size" else ")"))
    for key, (low, high, low_ok) in _WARMUP_RANGES.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (value >= low if low_ok else value > low) and value <= high):
            problems.append(f"{key}={value!r} (must be in {'[' if low_ok else '('}{low:g}, {high:g}])")
    blur = OmegaConf.select(cfg, "warmup.central.median_blur")
    if isinstance(blur, int) and blur > 0 and blur % 2 == 0:
        problems.append(f"warmup.central.median_blur={blur} (a median blur's kernel size is odd; 0 for none)")
    features = OmegaConf.select(cfg, "warmup.rff.n_features")
    if isinstance(features, int) and features % 2:
        problems.append(f"warmup.rff.n_features={features} (must be even: a cos and a sin per frequency)")
    fraction = OmegaConf.select(cfg, "dp.memory_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        problems.append(f"dp.memory_fraction={fraction!r} (must be in (0, 1])")
    ema = OmegaConf.select(cfg, "model.ema_rate")
    if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
        problems.append(f"model.ema_rate={ema!r} (must be in [0, 1))")
    if problems:
        raise ConfigError("invalid config values: " + "; ".join(problems))


def config_from_dict(tree: dict, origin: str = "checkpoint") -> DictConfig:
    """A resolved config saved as a plain dict (e.g. in a checkpoint), validated against the schema."""
    return _merge(OmegaConf.structured(Config), OmegaConf.create(tree), origin)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (for checkpoints and comparisons)."""
    return OmegaConf.to_container(cfg, resolve=True)
