"""DPDM training: data -> loss with K rows per example -> DP engine -> Adam -> EMA -> checkpoint.

``train(cfg, workdir)`` runs (or resumes) one run of a config: the privacy plan is fixed before
the first step (sigma calibrated for the whole schedule), every step is a Poisson batch split into
physical batches of whole examples, and the latest checkpoint always sits at
``WORKDIR/checkpoint.pt``. A resumed run continues exactly: the Poisson sampler's, the loss's and
the noise's generators, the accountant's ledger and the engine's autotune choices (kept in
``private/``) are all restored.

Every step is released at most once: a checkpoint is written at every step whose output (a sample
grid, a numbered checkpoint) is released, before that output, so a resume never re-draws a released
step (in secure mode a re-drawn step would get fresh noise: two releases of one step, counted once).
What depends on the private data without noise goes to ``WORKDIR/private/`` (see ``private_files``).
"""
from __future__ import annotations

import contextlib
import hashlib
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import dpdm_fast

from ..config import to_plain, validate_counts
from ..data import build_dataset
from ..diffusion import build_loss
from ..engine import BatchMemoryManager, autotune
from ..engine.distributed import ReplicaError, Replicas, dataset_fingerprint, exact_float
from ..generate import build_model, generate
from ..imaging import save_grid
from .. import checkpoint as ckpt
from .ema import EMA
from .memory_plan import AUTO, PassPlan, check_fixed_pass, fixed_pass_size, plan_passes, why_saved_pass_misfits
from .monitor import Monitor, SilentMonitor, StepStats, plot_curves
from .optimizers import build_optimizer
from .privacy_plan import PrivacyPlan, plan_privacy, quiet_accountant
from .private_files import (data_check, data_key, mark_released, read_resume_state, released_step,
                            write_resume_state)
from .ranks import Ranks, backend_name, barrier, gather_objects, result_from_main, seed_for_rank
from .warm_start import WarmStart, planned_releases, warmup_started

CHECKPOINT = "checkpoint.pt"
SNAPSHOT_NOISE_SEED = 12345   # snapshot grids start from the same noise at every snapshot (and in every run)
FP16_LOSS_SCALE = 2.0**16   # --amp fp16: GradScaler's default initial scale, kept fixed (a backoff would depend on the data)


@dataclass
class TrainResult:
    step: int
    epsilon: float
    wall_s: float
    finished: bool          # the whole schedule (or the whole budget) is done
    interrupted: str | None  # the signal that stopped the run early, if any (on any rank)
    checkpoint: Path
    world_size: int = 1


class _Interrupt:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, writes a checkpoint and returns.
    A second signal of the same kind falls back to the default action (e.g. Ctrl-C twice aborts),
    except in a distributed run (``keep=True``): there a scheduler and torchrun may each pass the same
    signal on, and rank 0 must not die while it writes the checkpoint (torchrun kills after its timeout)."""

    def __init__(self, keep: bool = False):
        self.signal: str | None = None
        self._previous = {}
        self._keep = keep

    def _handle(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name
        if not self._keep:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: no handlers, no clean stop
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _seeds(seed: int) -> dict[str, int]:
    """Independent seeds for the network's initialisation, the Poisson sampler, the loss and the noise."""
    names = ("init", "poisson", "loss", "noise")
    return dict(zip(names, (int(s) for s in np.random.SeedSequence(seed).generate_state(len(names)))))


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA device")
    return dev


def _check_writable(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{id(workdir)}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ckpt.CheckpointError(f"the workdir {workdir} is not writable ({e.strerror or e}): choose another "
                                   "--workdir or fix its permissions") from None


def legacy_data_fingerprint(dataset) -> str:
    """The unkeyed hash that checkpoints of dpdm_fast <= 0.1 hold (``data_fingerprint``; it identifies the
    data to anyone holding candidate datasets: such checkpoints should not be shared). Read to resume them."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for name in ("data", "targets"):
        array = getattr(dataset, name, None)
        if array is not None:
            array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _config_hash(tree: dict) -> str:
    """What every rank must agree on: the config without where things are (setup.*, data.path)."""
    import json
    kept = {k: v for k, v in tree.items() if k != "setup"}
    kept["data"] = {k: v for k, v in kept.get("data", {}).items() if k != "path"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


class Trainer:
    """One training run of a config in a workdir (see module docstring). ``run()`` trains.

    Inside a torch.distributed job (``torchrun``) every rank constructs a Trainer on the same config:
    they train one model (see ``dpdm_fast.training.ranks``); rank 0 reads and writes the workdir.
    """

    def __init__(self, cfg: DictConfig, workdir: str | Path, *, resume: bool = False, max_steps: int | None = None,
                 amp: bool | str = False, device: str | None = None, progress: bool = True):
        validate_counts(cfg)   # before anything touches the data: a bad frequency must not fail after a step
        self.cfg, self.workdir = cfg, Path(workdir)
        self.device = resolve_device(device)
        self.amp, self.progress, self.max_steps = amp_mode(amp), progress, max_steps
        self.config_tree = to_plain(cfg)
        self.ranks = Ranks.current()
        if cfg.warmup.enabled and self.ranks.distributed:
            raise ValueError("warmup.enabled in a distributed run is not supported yet: run the warm-up and DP-SGD in "
                             "one process, or turn the warm-up off")
        self.ckpt_path = self.workdir / CHECKPOINT
        self.private_note: str | None = None   # why a resume found no private resume state (rank 0 only)
        saved = self._checkpoint_on_every_rank(resume)
        # The memory probe runs before the private data is loaded: the free memory it reads, and so the pass
        # size (saved in the checkpoint, printed), must not depend on the dataset's size.
        self.pass_plan: PassPlan | None = None   # dp.max_physical_batch_size: auto, probed by this run
        self.pass_memory: dict | None = None     # its record (or the resumed checkpoint's), saved with each checkpoint
        self.replan_note: str | None = None      # why a resumed auto run did not keep its checkpoint's pass size
        self.memory_note: str | None = None      # a numeric pass's memory check (CPU, freed memory kept)
        self.physical_batch_size = self._pass_size(saved)

        self.dataset = self._training_dataset()
        dp, public_size = cfg.dp, cfg.data.public_size
        # With data.public_size, nothing of the mechanism (q, steps, divisor) nor of the logs depends on len(dataset).
        self.plan: PrivacyPlan = plan_privacy(n_examples=len(self.dataset) if public_size is None else public_size,
                                              batch_size=cfg.train.batch_size, n_epochs=cfg.train.n_epochs,
                                              epsilon=dp.epsilon, delta=dp.delta, max_grad_norm=dp.max_grad_norm,
                                              accountant=dp.accountant, size_is_public=public_size is not None,
                                              releases=planned_releases(cfg))
        if max_steps is not None and not 1 <= max_steps <= self.plan.total_steps:
            raise ValueError(f"--max-steps {max_steps}: the schedule has {self.plan.total_steps} steps "
                             f"({cfg.train.n_epochs} epochs of {self.plan.steps_per_epoch})")
        self._build(saved)

    # -- setup --------------------------------------------------------------------------------
    def _pass_size(self, saved: dict | None) -> int:
        """Examples per forward/backward pass: from the config (DPDM's n_splits passes per physical batch), or
        for ``auto`` from a memory probe on rank 0's device. A resumed run reuses its checkpoint's size, so it
        continues exactly (the loss draws its noise per pass), unless that pass was planned on another kind of
        device or no longer fits in the memory free here: then it plans anew and says so."""
        if self.cfg.dp.max_physical_batch_size != AUTO:
            examples = fixed_pass_size(self.cfg)
            self.memory_note = result_from_main(
                self.ranks, lambda: check_fixed_pass(self.cfg, self.device, examples, self.amp, self.ranks.world_size))
            return examples
        if saved is not None and saved.get("examples_per_pass"):
            record = saved.get("pass_memory")
            misfit = result_from_main(
                self.ranks, lambda: why_saved_pass_misfits(record, self.device, float(self.cfg.dp.memory_fraction)))
            if misfit is None:
                self.pass_memory = record
                return int(saved["examples_per_pass"])
            self.replan_note = (f"{misfit}: planned anew on this device (the Poisson batches and the DP noise continue "
                                f"exactly; the diffusion-noise draws split differently from passes of "
                                f"{saved['examples_per_pass']})")

        self.pass_plan = result_from_main(self.ranks, lambda: plan_passes(self.cfg, self.device, self.amp))
        self.pass_memory = self.pass_plan.record()
        return self.pass_plan.examples_per_pass

    def _training_dataset(self):
        """The private training set (the audit's trainer adds its canaries here)."""
        if not self.cfg.data.path:
            raise ValueError("data.path is not set: point it at the dataset folder (e.g. data.path=../shared/data/mnist)")
        return build_dataset(self.cfg.data.name, self.cfg.data.path)

    def _checkpoint_on_every_rank(self, resume: bool) -> dict | None:
        """Rank 0 checks the workdir and reads the checkpoint; every rank gets it (or rank 0's error), so
        the other nodes need no shared disk and all ranks fail alike."""
        def read() -> dict | None:
            _check_writable(self.workdir)
            return self._existing_checkpoint(resume)
        return result_from_main(self.ranks, read)

    def _existing_checkpoint(self, resume: bool) -> dict | None:
        exists = self.ckpt_path.exists()
        warm = self.cfg.warmup.enabled and warmup_started(self.workdir)
        if not resume:
            if warm and not exists:
                raise ckpt.CheckpointError(f"{self.workdir} already holds the warm-up releases of a run: pass --resume to "
                                           "continue it, or choose another --workdir for a new run")
            if exists:
                state = ckpt.load(self.ckpt_path)
                diffs = ckpt.config_differences(state.get("config", {}), self.config_tree)
                what = (f"a different run (config differs in: {'; '.join(diffs[:4])})" if diffs
                        else f"this run, at step {state.get('step')}")
                raise ckpt.CheckpointError(f"{self.workdir} already holds {what}. Pass --resume to continue it, or "
                                           "choose another --workdir for a new run")
            return None
        if not exists:
            if warm:
                return None   # the warm-up had begun: its finished stages are read back, DP-SGD starts afresh
            raise ckpt.CheckpointError(f"--resume: no checkpoint at {self.ckpt_path}; start the run without --resume")
        state = ckpt.load(self.ckpt_path, map_location="cpu")
        ckpt.check_training_checkpoint(state, self.ckpt_path, self.config_tree)
        released = released_step(self.workdir)
        if int(state["step"]) < released:
            raise ckpt.CheckpointError(f"{self.ckpt_path} is at step {state['step']}, but this run has already released "
                                       f"the output of step {released} (a checkpoint or a sample grid): resuming from "
                                       "it would draw steps that were released once again, with fresh noise in secure "
                                       "mode, while the accountant counts each once. Resume from the checkpoint of "
                                       f"step {released} or later, or start a new run")
        # the part of the checkpoint that depends on the private batch sizes is kept in private/ (older checkpoints
        # hold it themselves)
        private, self.private_note = read_resume_state(self.workdir, int(state["step"]))
        if private is not None:
            state["autotune"], state["streams"] = private["autotune"], private["streams"]
        return state

    def _build(self, saved: dict | None) -> None:
        from ..engine.api.privacy_engine import PrivacyEngine

        cfg, device, plan, ranks = self.cfg, self.device, self.plan, self.ranks
        seeds = self.seeds = _seeds(cfg.train.seed)
        # rank 0 holds the workdir: the data check (keyed, for checkpoints) and the resume's verdict on the data
        self.data_check = None
        problem = self._check_data(saved) if ranks.is_main else None
        self.replicas = Replicas.current() if ranks.distributed else None
        if self.replicas is not None:
            # the ranks' own comparison of their data (exchanged between them, never written or printed); any
            # failure before it is announced there (ok = 0), so that no rank waits for the others' collective
            try:
                fingerprint = exact_float(dataset_fingerprint(self.dataset))
            except Exception as e:   # noqa: BLE001
                problem, fingerprint = problem or e, 0.0
            try:
                self.replicas.agree({"ok": float(problem is None), "config": exact_float(_config_hash(self.config_tree)),
                                     "training data (a hash of its images and labels)": fingerprint},
                                    device, "the start of the run",
                                    withheld=("training data (a hash of its images and labels)",))
            except ReplicaError:
                if problem is None:
                    raise
        if problem is not None:
            raise problem
        torch.manual_seed(seeds["init"])   # (the engine broadcasts rank 0's initial weights anyway)
        self.model = build_model(cfg).to(device)
        self.network = self.model.model
        self.loss_fn = build_loss(**cfg.loss)
        self.labelled = bool(cfg.data.n_classes)
        self.warmup_log: list[str] = []
        if cfg.warmup.enabled and saved is None:   # (a resumed DP-SGD run has its weights in the checkpoint)
            self.warmup_log = WarmStart(cfg, self.workdir, device, progress=self.progress).run(
                self.dataset, self.model, self.data_check)
            torch.manual_seed(seeds["init"])       # DP-SGD's dropout stream as without a warm-up
        optimizer = build_optimizer(cfg, self.model.parameters())

        # Every rank draws the same Poisson masks (each keeps its shard: together, the one-process batch) and
        # holds the same noise generator (only rank 0 draws from it); the loss's noise and dropout are per rank.
        self.poisson_gen = torch.Generator().manual_seed(seeds["poisson"])
        self.loss_gen = torch.Generator(device=device).manual_seed(seed_for_rank(seeds["loss"], ranks.rank))
        self.noise_gen = None if cfg.dp.secure_mode else torch.Generator(device=device).manual_seed(seeds["noise"])
        if ranks.rank > 0:
            torch.manual_seed(seed_for_rank(seeds["init"], ranks.rank))
        # The loader reads in the main process (num_workers=0): the datasets are held in memory, and a
        # worker prefetching ahead would advance the Poisson sampler past the checkpointed step.
        loader = DataLoader(self.dataset, batch_size=cfg.train.batch_size, shuffle=True, generator=self.poisson_gen)
        with warnings.catch_warnings():   # its secure-RNG advice is printed with the plan instead
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=cfg.dp.accountant, secure_mode=cfg.dp.secure_mode)
        self.private, self.optimizer, self.loader = self.engine.make_private(
            module=self.model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, noise_multiplicity=cfg.loss.n_noise_samples,
            noise_generator=self.noise_gen, backend=cfg.dp.backend, distributed=ranks.distributed,
            public_dataset_size=cfg.data.public_size, grad_sample_views=False)   # (no scaling pass)
        self.loss_scaler = None
        if self.amp == "fp16":   # a fixed scale: under DP it never backs off (see DPOptimizer.attach_grad_scaler)
            self.loss_scaler = torch.amp.GradScaler(self.device.type, init_scale=FP16_LOSS_SCALE, growth_interval=10**9)
            self.optimizer.attach_grad_scaler(self.loss_scaler, examples_per_pass=self.physical_batch_size)
        if self.loader.sample_rate != plan.sample_rate:   # the accountant is told exactly the sampler's rate
            raise RuntimeError(f"internal: loader samples at {self.loader.sample_rate}, plan says {plan.sample_rate}")
        if self.optimizer.expected_batch_size != plan.divisor:
            raise RuntimeError(f"internal: the engine divides by {self.optimizer.expected_batch_size}, the plan "
                               f"says {plan.divisor}")
        if saved is None and plan.releases:   # the ledger starts with what the warm-up released
            self.engine.compose_releases([r.entry for r in plan.releases])
        self.ema = EMA(self.network, cfg.model.ema_rate)
        self.resume_note = None
        self.step, self.wall_before = 0, 0.0
        if saved is not None:
            self._restore(saved)

    def _check_data(self, saved: dict | None) -> Exception | None:
        """Rank 0: the keyed data check for checkpoints (a new run, or the first resume of a checkpoint of an
        older version, makes the key), and on resume whether the data is the run's (the error, or None)."""
        try:
            key = data_key(self.workdir, create=saved is None or "data_check" not in saved)
            self.data_check = data_check(self.dataset, key)
        except Exception as e:   # noqa: BLE001 (in a distributed run the other ranks must hear of it)
            return e
        if saved is None:
            return None
        if "data_check" in saved:
            same = saved["data_check"] == self.data_check
        else:   # a checkpoint of an older version: its unkeyed hash (the new checkpoints drop it)
            same = saved.get("data_fingerprint") == legacy_data_fingerprint(self.dataset)
        if same:
            return None
        return ckpt.CheckpointError(
            f"{self.ckpt_path}: the training data at {self.cfg.data.path} is not the data this run was trained on "
            "(different examples or labels): the guarantee is for one dataset, so the run cannot continue on "
            "another; start a new run")

    def _restore(self, state: dict) -> None:
        plan = self.plan
        saved_plan = state["privacy"]["plan"]
        if saved_plan["noise_multiplier"] != plan.noise_multiplier or saved_plan["sample_rate"] != plan.sample_rate:
            raise ckpt.CheckpointError(f"{self.ckpt_path}: its run used sigma={saved_plan['noise_multiplier']} at "
                                       f"q={saved_plan['sample_rate']}, this one computes sigma={plan.noise_multiplier} "
                                       f"at q={plan.sample_rate} (different dataset size or Opacus version?): resuming "
                                       "would break the privacy calibration")
        step = int(state["step"])
        if step >= plan.budget_steps:
            raise ckpt.CheckpointError(f"{self.ckpt_path}: the run is complete ({step} of {plan.total_steps} steps, "
                                       f"eps={plan.epsilon_after(step):.4f} of {plan.target_epsilon:g} spent); nothing "
                                       "to resume. Sample from it with `dpdm-fast sample`")
        if self.max_steps is not None and self.max_steps <= step:
            raise ValueError(f"--max-steps {self.max_steps}: the checkpoint is already at step {step}")
        planned = [r.entry for r in plan.releases]
        saved_releases = [tuple(e) for e in state["privacy"]["engine"].get("prior_releases", [])]
        if saved_releases != planned:
            raise ckpt.CheckpointError(f"{self.ckpt_path}: its ledger starts with the releases {saved_releases}, this "
                                       f"config plans {planned}: resuming would miscount the budget")
        ckpt.load_network_weights(self.network, state["model"])
        self.ema.load_state_dict(state["ema"], state["ema_num_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.load_state_dict(state["privacy"]["engine"])
        if self.engine.steps != step:
            raise ckpt.CheckpointError(f"{self.ckpt_path}: the ledger holds {self.engine.steps} steps but the checkpoint "
                                       f"is at step {step}: the checkpoint is inconsistent")
        rng = state["rng"]
        self.poisson_gen.set_state(rng["poisson"])     # the same on every rank, whatever their number
        if self.noise_gen is not None and rng.get("noise") is not None:
            self.noise_gen.set_state(rng["noise"])
        saved_world = int(rng.get("world_size", 1))
        ranks = self.ranks
        streams = state.get("streams")   # from private/ (checkpoints of older versions: in their rng entry)
        if streams is None and "loss" in rng:
            streams = rng.get("per_rank") or [{"loss": rng["loss"], "torch": rng["torch"]}]
        if streams is not None and len(streams) == ranks.world_size:
            self.loss_gen.set_state(streams[ranks.rank]["loss"])
            restore_dropout_rng(streams[ranks.rank], self.device)
        else:   # another number of ranks, or no private state: the loss noise and dropout streams start afresh
            self.loss_gen.manual_seed(seed_for_rank(self.seeds["loss"], ranks.rank, step, ranks.world_size))
            torch.manual_seed(seed_for_rank(self.seeds["init"], ranks.rank, step, ranks.world_size))
            why = (f"resuming a run of {saved_world} process(es) on {ranks.world_size}" if streams is not None
                   else f"no private resume state ({self.private_note or 'not sent'})")
            self.resume_note = (f"{why}: the Poisson batches and the DP noise continue exactly; each rank's "
                                "diffusion-noise and dropout streams are re-derived from the seed")
        autotune.load_state_dict(state.get("autotune", []))
        self.step, self.wall_before = step, float(state.get("wall_s", 0.0))

    def _epsilon(self) -> float:
        with quiet_accountant():
            return self.engine.get_epsilon(self.plan.delta)

    # -- checkpoints --------------------------------------------------------------------------
    def _own_rng(self) -> dict:
        return {"loss": self.loss_gen.get_state(), **dropout_rng_state(self.device)}

    def state_dict(self, wall_s: float) -> dict:
        """The checkpoint (what may be released: nothing in it depends on the private batch sizes; the
        generators it holds advance by data-independent amounts per step)."""
        return {
            "format": ckpt.FORMAT, "version": dpdm_fast.__version__, "step": self.step, "config": self.config_tree,
            "model": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "ema": {k: v.cpu() for k, v in self.ema.state_dict().items()}, "ema_num_updates": self.ema.num_updates,
            "optimizer": self.optimizer.state_dict(),
            "privacy": {"engine": self.engine.state_dict(), "plan": self.plan.as_dict(),
                        "epsilon": self._epsilon()},
            "rng": {"poisson": self.poisson_gen.get_state(),
                    "noise": None if self.noise_gen is None else self.noise_gen.get_state(),
                    "world_size": self.ranks.world_size},
            "wall_s": wall_s, "data_check": self.data_check, "examples_per_pass": self.physical_batch_size,
            "pass_memory": self.pass_memory,
        }

    def save(self, wall_s: float, numbered: bool = False) -> Path:
        """Rank 0 writes the checkpoint (every rank calls this: it gathers their generator states). Order: the
        private resume state, the checkpoint, its numbered copy, then the record that this step is released."""
        streams = gather_objects(self._own_rng()) if self.ranks.distributed else [self._own_rng()]
        if not self.ranks.is_main:
            return self.ckpt_path
        state = self.state_dict(wall_s)
        # the loss / torch generators advance with every physical batch and example, and the autotune keys are
        # bucketed physical batch sizes: functions of the private batch sizes, so they stay in private/
        write_resume_state(self.workdir, self.step, {"autotune": autotune.state_dict(), "streams": streams})
        path = ckpt.save_atomic(state, self.ckpt_path)
        if numbered:
            ckpt.save_atomic(state, self.workdir / "checkpoints" / f"step_{self.step:07d}.pt")
        mark_released(self.workdir, self.step)
        return path

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, name: str) -> Path:
        """A grid of EMA samples from fixed noise: one row per class (8 x 8 when unconditional)."""
        model = build_model(self.cfg).to(self.device)
        model.model.load_state_dict(self.ema.state_dict())
        model.eval()
        n_classes = self.cfg.data.n_classes
        per_row = 10 if n_classes else 8
        labels = torch.arange(n_classes).repeat_interleave(per_row) if n_classes else None
        n = len(labels) if labels is not None else 64
        images = generate(model, self.cfg, n, labels, seed=SNAPSHOT_NOISE_SEED, batch_size=n,
                          device=self.device, progress=False)
        return save_grid(images, self.workdir / "samples" / f"{name}.png", nrow=per_row, scale=2)

    # -- the loop -----------------------------------------------------------------------------
    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp])

    def _physical_batch(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats) -> None:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if self.labelled else None
        with self._autocast():
            losses = self.loss_fn(self.private, x, y, generator=self.loss_gen)
        if len(x) == 0:      # an empty Poisson batch is still a step (pure noise): backward through nothing
            losses.sum().backward()
            return
        if self.loss_scaler is None:
            losses.float().mean().backward()
        else:
            # fp16: the engine divides each example's gradient by scale / physical_batch_size before clipping.
            # Divided by that public size, not by this pass's (which follows the Poisson batch's size), an
            # example's scaled gradient, and whether it overflows, depend on the example alone. The scale is
            # fixed, so the plain optimizer.step() applies it (GradScaler.step/update would change nothing).
            self.loss_scaler.scale(losses.float().sum() / self.physical_batch_size).backward()
        norms = self.private.collector.last_norms
        stats.add_batch(float(losses.detach().float().sum()), len(x), float(norms.sum()),
                        int((norms > self.plan.max_grad_norm).sum()))

    def _released(self) -> None:
        """Called once per step, right after its noisy update is in p.grad (the audit reads it here)."""

    def _end_of_step(self, stats: StepStats, interrupt: "_Interrupt") -> tuple[StepStats, str | None]:
        """The step's statistics over all ranks, and the signal that stops the run (if any rank got one).
        Every rank decides from the same numbers, so all stop after the same step."""
        if not self.ranks.distributed:
            return stats, interrupt.signal
        signal_name = interrupt.signal
        totals = self.replicas.sum_values([stats.loss_sum, stats.examples, stats.norm_sum, stats.clipped,
                                           signal_name == "SIGINT", signal_name == "SIGTERM"], self.device)
        merged = StepStats()
        merged.add_batch(totals[0], int(totals[1]), totals[2], int(totals[3]))
        return merged, "SIGTERM" if totals[5] else "SIGINT" if totals[4] else None

    def run(self) -> TrainResult:
        cfg, plan, main = self.cfg, self.plan, self.ranks.is_main
        stop_at = min(plan.budget_steps, self.max_steps or plan.total_steps)
        out = (Monitor(self.workdir, plan.total_steps, self.step, plan.steps_per_epoch, progress=self.progress)
               if main else SilentMonitor())
        out.write(plan.describe())
        if plan.releases:
            out.write(plan.describe_split())
        for line in self.warmup_log:
            out.write(line)
        if self.pass_plan is not None:
            out.write(self.pass_plan.describe(plan.expected_batch_size, plan.steps_per_epoch, cfg.dp.n_splits))
        out.write(f"K={cfg.loss.n_noise_samples} noise samples per example, physical batches of at most "
                  f"{self.physical_batch_size} examples (dp.max_physical_batch_size {cfg.dp.max_physical_batch_size} / "
                  f"dp.n_splits {cfg.dp.n_splits}), device {self.device}"
                  + (f", {self.amp} autocast" if self.amp else "")
                  + (f" with a fixed loss scale of {FP16_LOSS_SCALE:g}" if self.loss_scaler is not None else "") + (f"; resuming at step {self.step}" if self.step else ""))
        if self.ranks.distributed:
            out.write(f"{self.ranks.world_size} processes ({backend_name()}): each samples its shard of every Poisson "
                      "batch; the clipped sums are all-reduced and rank 0 adds the noise once (per-rank physical "
                      "batches as above)")
        for note in (self.replan_note, self.memory_note, self.resume_note):
            if note:
                out.write(note)
        if not cfg.dp.secure_mode:
            out.write("noise and sampling come from seeded generators (dp.secure_mode=false): reproducible, fine for "
                      "experiments; set dp.secure_mode=true for a model you release")
        log_freq, snap_freq, save_freq = cfg.train.log_freq, cfg.train.snapshot_freq, cfg.train.save_freq
        tuning = contextlib.nullcontext() if cfg.dp.autotune else autotune.fixed()
        start = time.perf_counter()
        wall = lambda: self.wall_before + time.perf_counter() - start  # noqa: E731
        stats = StepStats()
        stop_signal = None
        with _Interrupt(keep=self.ranks.distributed) as interrupt, tuning:
            try:
                while self.step < stop_at and stop_signal is None:
                    with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.physical_batch_size,
                                            optimizer=self.optimizer) as batches:
                        for x, y in batches:
                            before = self.engine.steps
                            try:
                                self._physical_batch(x, y, stats)
                                self.optimizer.step()
                            except Exception:
                                self.optimizer.abandon_step()   # the other ranks stop at this step too
                                raise
                            if self.engine.steps > before:
                                self._released()
                            self.optimizer.zero_grad(set_to_none=True)
                            if self.engine.steps == before:
                                continue       # a physical batch inside a logical one: noise comes at its end
                            self.step += 1
                            self.ema.update(self.network)
                            stats, stop_signal = self._end_of_step(stats, interrupt)
                            log = self.step % log_freq == 0 or self.step == stop_at or self.step == 1
                            eps = self._epsilon() if log else None
                            out.step(self.step, stats, log, eps, self.optimizer.param_groups[0]["lr"])
                            stats = StepStats()
                            snap, numbered = self.step % snap_freq == 0, self.step % save_freq == 0
                            if (snap or numbered) and self.step < stop_at:
                                # the checkpoint first: a resume never re-draws a step whose grid was released
                                self.save(wall(), numbered=numbered)
                                if snap and main:
                                    self.snapshot(f"step_{self.step:07d}")
                            if self.step >= stop_at or stop_signal is not None:
                                break
                self.save(wall(), numbered=self.step % save_freq == 0)
                if self.ranks.distributed:
                    barrier()   # no rank exits (which torchrun could take for a failure) before rank 0 has written
            finally:
                out.close()
        finished = self.step >= plan.budget_steps
        eps = self._epsilon()
        if eps > plan.target_epsilon + 1e-9:   # the plan makes this impossible; say so loudly if it ever is not
            raise RuntimeError(f"privacy budget exceeded: eps={eps} > target {plan.target_epsilon}")
        result = TrainResult(step=self.step, epsilon=eps, wall_s=wall(), finished=finished, interrupted=stop_signal,
                             checkpoint=self.ckpt_path, world_size=self.ranks.world_size)
        if not main:
            return result
        if finished:
            self.snapshot("final")
        elif stop_signal is None:     # --max-steps; after a signal, exit promptly instead
            self.snapshot(f"step_{self.step:07d}")
        plot_curves(self.workdir)
        how = (f"interrupted by {stop_signal}" if stop_signal else "finished" if finished
               else f"stopped at --max-steps {self.max_steps}")
        print(f"{how}: step {self.step}/{plan.total_steps}, eps={eps:.4f} at delta={plan.delta:g} "
              f"({plan.accountant} accountant), wall {wall():.0f} s, checkpoint {self.ckpt_path}"
              + ("" if finished else "; continue with --resume"))
        return result


def amp_mode(amp: bool | str | None) -> str | None:
    """``--amp``'s value: None (fp32), "bf16" (True, as before) or "fp16" (with a fixed loss scale)."""
    if amp in (None, False):
        return None
    if amp is True:
        return "bf16"
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp={amp!r}: expected 'bf16' or 'fp16' (or True for bf16)")
    return amp


def dropout_rng_state(device: torch.device) -> dict:
    """The default generators that dropout draws from: the CPU's, and on a GPU also that device's (a GPU
    run's dropout masks come from it, so without it a resume would not continue bitwise)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_dropout_rng(state: dict, device: torch.device) -> None:
    """Set what ``dropout_rng_state`` saved (a CUDA state only on a CUDA device: a run moved from a GPU to the
    CPU keeps the CPU stream; one moved to a GPU from a CPU checkpoint keeps the seeded CUDA stream)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(cfg: DictConfig, workdir: str | Path, **kwargs) -> TrainResult:
    """Train (or with ``resume=True`` continue) the run of ``cfg`` in ``workdir``; see :class:`Trainer`."""
    return Trainer(cfg, workdir, **kwargs).run()
