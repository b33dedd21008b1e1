"""``dp.max_physical_batch_size: auto``: the largest pass that fits in memory, measured by a probe.

The probe builds the configured network, loss and optimizer on the device, wraps them in the DP engine
(the configured K, clip bound and backend, noise on) and runs whole DP steps (forward over K rows per
example, backward with per-example gradients, clip, noise, optimizer) at two small numbers of examples,
measuring each step's peak memory and time. Memory grows about linearly with the examples of a pass (rows,
activations, the per-example buffer), so the two peaks give the bytes per example and the fixed part
(the probe's own model, engine and optimizer state, standing for the training run's, which is built
after the probe; the run's EMA copy is not measured: ``dp.memory_fraction``'s margin covers it, a few MiB
for the published networks); the plan is the largest pass that fits in ``dp.memory_fraction`` of the
memory free when it is measured (GPU: ``torch.cuda.mem_get_info``; CPU: the kernel's MemAvailable,
which does not see a container's cgroup limit: inside a smaller container, set a number instead; shared
equally by the run's processes on the node, each of which runs such passes at once).

Privacy: the probe's images are zeros and its labels 0; nothing of the private data is read, so the
pass size depends on the device and the config only (and the physical batching never changes the
update's mathematics, only how many examples share a forward pass).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..diffusion import build_loss
from ..engine import DPOptimizer, PrivateModule, autotune
from ..engine import cpu_allocator
from ..engine.profiling import peak_allocated_bytes, peak_resident_growth, resident_growth_measurable
from ..generate import build_model
from .optimizers import build_optimizer

AUTO = "auto"
PROBE_EXAMPLES = {"cpu": (2, 4), "cuda": (8, 16)}   # small on the CPU: each example is K full rows


@dataclass(frozen=True)
class Probe:
    """One probe step: its examples, peak bytes above the start, and seconds (median of the timed repeats)."""
    examples: int
    peak_bytes: int
    seconds: float


@dataclass(frozen=True)
class PassPlan:
    """The largest pass (examples per forward/backward) that fits, and the linear models behind it."""
    device: str
    examples_per_pass: int
    bytes_per_example: float
    fixed_bytes: float
    free_bytes: int
    memory_fraction: float
    seconds_per_example: float
    seconds_per_pass: float        # the fixed time of a pass (launches, the step's noise and optimizer)
    probes: tuple[Probe, ...]
    planned: Probe                 # the step at the planned size itself, whose measured peak fits
    resident: bool = False         # peaks are the process's resident growth (CPU, freed memory kept)
    too_large: tuple[Probe, ...] = ()   # verification steps whose peak did not fit (peak -1: GPU out of memory)
    sharing: int = 1               # processes of the run on this node's memory (CPU), free_bytes being one's share

    def peak_bytes(self, examples: int) -> float:
        return self.fixed_bytes + examples * self.bytes_per_example

    def seconds_per_step(self, expected_batch: float, examples_per_pass: int | None = None) -> float:
        """Projected time of a step of ``expected_batch`` examples in passes of at most examples_per_pass."""
        per_pass = examples_per_pass or self.examples_per_pass
        return math.ceil(expected_batch / per_pass) * self.seconds_per_pass + expected_batch * self.seconds_per_example

    def describe(self, expected_batch: float, steps_per_epoch: float, n_splits: int = 1) -> str:
        gib = 2.0**30
        step_s = self.seconds_per_step(expected_batch)
        measured = ", resident: freed memory is kept" if self.resident else ""
        lines = [
            f"physical batch (dp.max_physical_batch_size: auto) on {self.device}: passes of {self.examples_per_pass} "
            f"examples (max_physical_batch_size = {self.examples_per_pass * n_splits} in {n_splits} split(s))",
            f"  memory: {self.bytes_per_example / 2**20:.1f} MiB per example + {self.fixed_bytes / 2**20:.0f} MiB "
            f"fixed (fitted{measured}); {self.memory_fraction * 100:g}% of {self.free_bytes / gib:.1f} GiB free"
            + (f" (this process's share: {self.sharing} processes of the run on this node's memory)"
               if self.sharing > 1 else "") + f"; a pass of "
            f"{self.examples_per_pass} measured at {self.planned.peak_bytes / gib:.2f} GiB",
            "  probe steps: " + ", ".join([_step_text(p) for p in self.probes]
                                          + [_step_text(p) + " (too large)" for p in self.too_large]
                                          + [_step_text(self.planned)]),
            f"  time (measured at the planned size and the smallest): {self.seconds_per_example * 1e3:.1f} ms per example + "
            f"{self.seconds_per_pass:.2f} s per pass; a step of {expected_batch:g} examples about {step_s:.0f} s, "
            f"an epoch ({steps_per_epoch:g} steps) about {_duration(step_s * steps_per_epoch)}",
        ]
        return "\n".join(lines)

    def record(self) -> dict:
        """What a checkpoint keeps of the plan, so that a resumed run can check that the pass still fits
        (the device and memory only: nothing of the data)."""
        return {"device": self.device, "peak_bytes": int(self.planned.peak_bytes), "resident": self.resident}


def why_saved_pass_misfits(record: dict | None, device: torch.device, fraction: float) -> str | None:
    """Why a checkpoint's planned pass (its ``PassPlan.record()``) should not be reused on ``device``: planned
    on another kind of device, its peak measured as the tensors' while this CPU run keeps freed memory (whose
    cost is the resident growth), or its measured peak above ``fraction`` of the memory free here now. None
    when it fits, or when the checkpoint recorded no plan (older versions: their size is kept as before)."""
    if not record:
        return None
    saved_device = torch.device(record["device"])
    if saved_device.type != device.type:
        return f"the checkpoint's pass size was planned on {saved_device}, this run is on {device}"
    if measures_resident(device) and not record.get("resident", False):
        return ("the checkpoint's pass peak counts the tensors only, and this run keeps freed memory in the process "
                "(its fragmentation too): the resident memory is measured anew")
    budget = fraction * free_memory(device)
    if record["peak_bytes"] > budget:
        return (f"the checkpoint's pass peaked at {record['peak_bytes'] / 2**30:.2f} GiB, above {fraction * 100:g}% of "
                f"the {budget / fraction / 2**30:.2f} GiB free on {device} now")
    return None


def _step_text(step: Probe) -> str:
    if step.peak_bytes < 0:
        return f"{step.examples} examples: out of memory"
    return f"{step.examples} examples: {step.peak_bytes / 2**20:.0f} MiB, {step.seconds:.2f} s"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def free_memory(device: torch.device) -> int:
    """Bytes free for this process on the device now: on the CPU its share of the node's available memory,
    which every process of the run on this node draws on (``processes_sharing_memory``)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return _available_cpu_memory() // processes_sharing_memory(device)
    raise RuntimeError(f"dp.max_physical_batch_size: auto measures memory on CUDA GPUs and the CPU, not on "
                       f"{device}: set it to a number")


def processes_sharing_memory(device: torch.device) -> int:
    """How many of the run's processes draw on the memory this one's pass comes from: on the CPU every
    process torchrun started on this node (``LOCAL_WORLD_SIZE``, else all of ``WORLD_SIZE``; each runs
    passes of the planned size at once, so planning each on the whole node's memory would overcommit it
    that many times), on a GPU one (each rank has its own device). Rank 0 plans for every node: nodes
    are taken to be alike."""
    if device.type != "cpu":
        return 1
    name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in os.environ else "WORLD_SIZE"
    # (ranks started by hand, without torchrun's LOCAL_WORLD_SIZE: all of them may be on this node)
    text = os.environ.get(name, "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r}: expected a number of processes (torchrun sets it)")
    return int(text)


def _available_cpu_memory() -> int:
    """The kernel's MemAvailable, in bytes (the heap's free pages handed back first)."""
    available = cpu_allocator.available_bytes()
    if available is not None:
        return available
    raise RuntimeError("dp.max_physical_batch_size: auto reads the free memory from /proc/meminfo (Linux), "
                       "which is not readable here: set dp.max_physical_batch_size to a number")


def probe_step(cfg: DictConfig, device: torch.device, examples: int, amp: str | None = None):
    """One DP step of the configured network on ``examples`` synthetic examples (K rows each), as a function."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    private = PrivateModule(model, noise_multiplicity=cfg.loss.n_noise_samples, max_grad_norm=cfg.dp.max_grad_norm,
                            backend=cfg.dp.backend, grad_sample_views=False)
    optimizer = DPOptimizer(build_optimizer(cfg, model.parameters()), private.collector, noise_multiplier=1.0,
                            expected_batch_size=examples)
    if amp == "fp16":
        optimizer.attach_grad_scaler(torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_interval=10**9),
                                     examples_per_pass=examples)
    loss_fn = build_loss(**cfg.loss)
    data = cfg.data
    x = torch.zeros(examples, data.num_channels, data.resolution, data.resolution, device=device)
    y = torch.zeros(examples, dtype=torch.long, device=device) if data.n_classes else None
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(private, x, y, generator=generator).float().mean()   # = sum / examples (the trainer's)
        (optimizer.grad_scaler.scale(loss) if optimizer.grad_scaler is not None else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def probe(cfg: DictConfig, device: torch.device, examples: int, amp: str | None = None, repeats: int = 2) -> Probe:
    """Peak memory of building the probe and running one step (in one measurement), then its time. The
    step's first pass tunes every rule's path anew (with ``dp.autotune``), as a training run does at its
    first pass of each size: its candidate paths' temporaries count in the peak."""
    with _probe_tuning(cfg):
        return _probe(cfg, device, examples, amp, repeats)


def warm_up(cfg: DictConfig, device: torch.device, examples: int, amp: str | None = None) -> None:
    """One unmeasured probe step: first-use costs (thread pools, library pages) would otherwise count as
    the first measured probe's growth."""
    with _probe_tuning(cfg):
        probe_step(cfg, device, examples, amp)()


def _probe_tuning(cfg: DictConfig):
    """The rules' path choices of a probe: made anew and then dropped, neither reused nor left behind for
    the training run (whose shapes differ)."""
    stack = contextlib.ExitStack()
    stack.enter_context(autotune.isolated())
    if not cfg.dp.autotune:
        stack.enter_context(autotune.fixed())
    return stack


def _probe(cfg: DictConfig, device: torch.device, examples: int, amp: str | None, repeats: int) -> Probe:
    holder = {}

    def build_and_step() -> None:
        holder["step"] = probe_step(cfg, device, examples, amp)
        holder["step"]()

    def measure() -> None:
        holder["peak"] = peak_allocated_bytes(build_and_step, device)
        holder["times"] = [_timed(holder["step"], device) for _ in range(repeats)]
    if measures_resident(device):
        # the heap keeps what the pass freed, and its fragmentation: the resident growth over the build,
        # the step and its repeats (the heap settles after a pass or two) is what the machine must hold
        resident = peak_resident_growth(measure)
        peak = max(holder["peak"], resident or 0)
    else:
        measure()
        peak = holder["peak"]
    times = holder["times"]
    del holder
    return Probe(examples, peak, statistics.median(times))


def measures_resident(device: torch.device) -> bool:
    """Whether the probe's peaks are resident growth (the CPU, freed memory kept, Linux) or tensors'."""
    return device.type == "cpu" and cpu_allocator.is_keeping_freed_memory() and resident_growth_measurable()


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def plan_passes(cfg: DictConfig, device: torch.device, amp: str | None = None,
                probe_examples: tuple[int, int] | None = None, attempts: int = 4) -> PassPlan:
    """Probe the configured network at two sizes, predict the largest pass that fits in ``dp.memory_fraction``
    of the free memory, then run a step of that size: accepted if its measured peak fits, else the size is
    shrunk by the measured excess and tried again (the prediction is a straight line; some rules change
    their temporaries with the batch size). On the CPU a prediction more than four times the larger probe is
    first approached through a probe at half of it, which refits the line. The time per example comes from
    the small probe and the step at the planned size."""
    small, large = probe_examples or PROBE_EXAMPLES.get(device.type, (2, 4))
    if not 1 <= small < large:
        raise ValueError(f"probe sizes {small}, {large}: need 1 <= small < large")
    free = free_memory(device)
    resident = measures_resident(device)
    if resident:
        warm_up(cfg, device, small, amp)
    elif device.type == "cpu" and cpu_allocator.is_keeping_freed_memory():
        warnings.warn("freed memory is kept but this system does not let a process measure its resident peak "
                      "(/proc/self/clear_refs): the plan counts the tensors' peaks only, below what the kept heap "
                      f"holds; lower dp.memory_fraction or set {cpu_allocator.ENV}=system", stacklevel=2)
    probes = (probe(cfg, device, small, amp), probe(cfg, device, large, amp))
    # (a tiny network's per-example memory can drown in the allocator's noise, the larger probe peaking no
    # higher: the fit then says "about nothing per example", the cap below bounds the candidate, and the
    # verification step measures it like any other)
    per_example, fixed = _line_above(probes[0], probes[1], min_slope=1.0)
    fraction = float(cfg.dp.memory_fraction)
    budget = fraction * free
    # no pass larger than the expected batch (public): larger passes would only serve a Poisson excess, and
    # the verification step would run at a size training never reaches
    batch = int(cfg.train.batch_size)
    candidate = min(math.floor((budget - fixed) / per_example), batch)
    if device.type == "cpu" and candidate > 4 * large:
        # On the CPU a verification step that overshoots is not an error to catch but the OOM killer, and the
        # line through two small probes can be far off ten times further out (a kept heap's fragmentation
        # grows with the pass: Fashion-MNIST's first candidate measured about 20 GiB against a budget of 18.2).
        # A stepping stone at half the candidate refits the line where it is used, never less steep; only for a
        # candidate this far out, so that the stone's slope spans at least `large` examples (over fewer, a small
        # network's allocator noise decides it: a tiny test network's plan fell 3 examples short).
        stone = probe(cfg, device, candidate // 2, amp)
        per_example, fixed = _line_above(probes[1], stone, min_slope=per_example)
        probes += (stone,)
        candidate = min(math.floor((budget - fixed) / per_example), batch)
    too_large = []
    for _ in range(attempts):
        if candidate < 1:
            raise RuntimeError(
                f"dp.max_physical_batch_size: auto: not even one example fits in {fraction * 100:g}% of the "
                f"{free / 2**30:.2f} GiB free on {device} ({per_example / 2**20:.0f} MiB per example + "
                f"{fixed / 2**20:.0f} MiB fixed): free memory, raise dp.memory_fraction, or lower "
                "loss.n_noise_samples or the network's size")
        planned = _try(cfg, device, candidate, amp, repeats=2 if resident else 1)   # kept: the heap settles
        if planned is not None and planned.peak_bytes <= budget:
            break
        too_large.append(planned or Probe(candidate, -1, float("nan")))
        measured = planned.peak_bytes if planned is not None else 2 * budget   # (a GPU out of memory: halve)
        candidate = min(candidate - 1, math.floor(candidate * (budget - fixed) / max(measured - fixed, 1.0)))
    else:
        raise RuntimeError(f"dp.max_physical_batch_size: auto: no pass size found within {attempts} attempts "
                           f"that fits in {budget / 2**30:.2f} GiB on {device}: set it to a number")
    first = probes[0]
    seconds_per_example = max((planned.seconds - first.seconds) / max(planned.examples - first.examples, 1), 0.0)
    seconds_per_pass = max(first.seconds - first.examples * seconds_per_example, 0.0)
    if device.type == "cpu":
        cpu_allocator.release_free_memory()   # what the probes' larger tries left in the heap
    return PassPlan(str(device), candidate, per_example, fixed, free, fraction, seconds_per_example, seconds_per_pass,
                    probes, planned, resident, tuple(too_large), processes_sharing_memory(device))


def _line_above(lower: Probe, upper: Probe, min_slope: float) -> tuple[float, float]:
    """Bytes per example and fixed bytes of the line through ``lower`` with the two probes' slope, or
    ``min_slope`` where that is steeper: at or above both measured peaks (and the fixed part not negative)."""
    slope = max((upper.peak_bytes - lower.peak_bytes) / (upper.examples - lower.examples), min_slope)
    return slope, max(lower.peak_bytes - lower.examples * slope, 0.0)


def _try(cfg: DictConfig, device: torch.device, examples: int, amp: str | None, repeats: int) -> Probe | None:
    """A probe step of ``examples``; None when the GPU runs out of memory (the CPU has no such error)."""
    try:
        return probe(cfg, device, examples, amp, repeats=repeats)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def largest_pass(cfg: DictConfig, world_size: int = 1) -> int:
    """A bound on the examples one process's pass can hold whatever its configured size: a pass never holds
    more than the process's share of a Poisson batch, whose expected size m = train.batch_size / world_size
    is public; m + 4 sqrt(m) + 1 is above it but for odds of about 3e-5 per step (a memory estimate only:
    nothing of the mechanism depends on it, and nothing of the data's size enters)."""
    m = float(cfg.train.batch_size) / world_size
    return math.ceil(m + 4 * math.sqrt(m) + 1)


def check_fixed_pass(cfg: DictConfig, device: torch.device, examples: int, amp: str | None = None,
                     world_size: int = 1) -> str | None:
    """A numeric pass size on the CPU while freed memory is kept (``dpdm-fast train``'s default there): the
    line of what its largest pass will hold (``examples``, or fewer where the Poisson batch bounds it:
    ``largest_pass``), from two small probe steps, printed before the run starts; refused when that line
    passes twice the memory free (no probe noise is that large: the published 8192 / 4 on a CPU), with a
    warning above ``dp.memory_fraction`` of it. Why: the kept heap's resident cost is above the tensors' peak
    a number may have been sized by (1.46x at the MNIST network's pass of 48), and on the CPU an overshoot
    meets the OOM killer, not an error. None elsewhere (a GPU's overshoot is torch's OutOfMemoryError; glibc's
    own policy is what numbers were sized under) and for passes no larger than the probes."""
    small, large = PROBE_EXAMPLES["cpu"]
    bound = largest_pass(cfg, world_size)
    examples = min(examples, bound)
    if not measures_resident(device) or examples <= large:
        return None
    free = free_memory(device)
    warm_up(cfg, device, small, amp)
    per_example, fixed = _line_above(probe(cfg, device, small, amp), probe(cfg, device, large, amp), min_slope=1.0)
    cpu_allocator.release_free_memory()
    need, fraction, splits = fixed + examples * per_example, float(cfg.dp.memory_fraction), int(cfg.dp.n_splits)
    sharing = processes_sharing_memory(device)
    text = (f"memory check (dp.max_physical_batch_size {cfg.dp.max_physical_batch_size} / dp.n_splits {splits}, "
            f"freed memory kept): passes of up to {examples} examples need about {need / 2**30:.2f} GiB "
            f"({per_example / 2**20:.1f} MiB per example + {fixed / 2**20:.0f} MiB, the line through probe steps of "
            f"{small} and {large} examples) of the {free / 2**30:.1f} GiB free on {device}"
            + (f" (this process's share: {sharing} processes of the run on this node's memory)" if sharing > 1 else ""))
    fitting = min(math.floor((fraction * free - fixed) / per_example), int(cfg.train.batch_size))
    if fitting >= 1:
        advice = (f"dp.max_physical_batch_size=auto plans one that fits (about {fitting * splits} here, "
                  f"{fitting} examples a pass)")
    else:
        advice = (f"not even one example a pass fits in {fraction * 100:g}% of it: free memory, or lower "
                  "loss.n_noise_samples or the network's size")
    advice += f"; or set {cpu_allocator.ENV}=system to keep glibc's policy"
    if need > 2 * free:
        raise ValueError(text + f": far more than there is; {advice}")
    if need > fraction * free:
        return text + f"; above {fraction * 100:g}% of it, the OOM killer may stop this run: {advice}"
    return text


def fixed_pass_size(cfg: DictConfig) -> int:
    """The examples per forward/backward pass of a numeric dp.max_physical_batch_size (DPDM's n_splits:
    each physical batch runs as n_splits passes of whole examples)."""
    return -(-int(cfg.dp.max_physical_batch_size) // cfg.dp.n_splits)


def pass_size(cfg: DictConfig, device: torch.device, amp: str | None = None) -> int:
    """Examples per pass: the configured size, or for ``auto`` the probe's."""
    if cfg.dp.max_physical_batch_size == AUTO:
        return plan_passes(cfg, device, amp).examples_per_pass
    return fixed_pass_size(cfg)
