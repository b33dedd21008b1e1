"""dp.max_physical_batch_size: auto (issue 25 item 3): a probe of the configured network measures memory per
example, the plan takes the largest pass that fits in the stated fraction of the free memory, the trainer
uses it (and a resumed run keeps it), and `dpdm-fast info` prints it."""
import pytest
import torch

from dpdm_fast.config import ConfigError, validate_counts
from dpdm_fast.training import memory_plan
from dpdm_fast.training.loop import Trainer
from training_helpers import tiny_config, tiny_mnist

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


def test_the_plan_is_the_largest_pass_that_fits_and_a_pass_of_that_size_does_fit(data, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "data.path": ""})   # no data is read
    free = {}
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: free["bytes"])
    step = memory_plan.probe(cfg, CPU, 4)
    assert step.peak_bytes > 0
    # a machine where about 10 examples fit in 80% of the free memory
    free["bytes"] = int(step.peak_bytes * 10 / 4 / 0.8)
    plan = memory_plan.plan_passes(cfg, CPU)
    assert plan.bytes_per_example > 0 and plan.memory_fraction == 0.8
    assert plan.planned.examples == plan.examples_per_pass and 5 <= plan.examples_per_pass <= 20
    assert plan.planned.peak_bytes <= 0.8 * free["bytes"]          # measured, not only predicted, to fit
    bigger = memory_plan.probe(cfg, CPU, plan.examples_per_pass + 3)
    assert bigger.peak_bytes > 0.8 * free["bytes"]                  # and a few more would not have fitted
    assert plan.seconds_per_step(100) > 0
    text = plan.describe(expected_batch=100, steps_per_epoch=7, n_splits=1)
    assert f"passes of {plan.examples_per_pass} examples" in text and "measured at the planned size" in text


def test_no_pass_is_planned_larger_than_the_expected_batch(data, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "data.path": "", "train.batch_size": 6})
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 2**50)     # a PiB free: memory is no limit
    plan = memory_plan.plan_passes(cfg, CPU)
    assert plan.examples_per_pass == plan.planned.examples == 6


def test_a_probe_that_does_not_grow_with_the_batch_plans_the_expected_batch_and_verifies_it(data, monkeypatch):
    """A tiny network's per-example memory can drown in the allocator's noise (seen on this CPU after other
    tests): the candidate is then the expected batch, not ~1e10 examples, and the verification step decides."""
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "data.path": "", "train.batch_size": 6})
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 2**40)
    sizes = []

    def flat_probe(cfg, device, examples, amp=None, repeats=2):
        sizes.append(examples)
        return memory_plan.Probe(examples, 2**30, 1.0)     # the same peak at every size
    monkeypatch.setattr(memory_plan, "probe", flat_probe)
    plan = memory_plan.plan_passes(cfg, CPU)
    assert plan.examples_per_pass == 6 and sizes[-1] == 6


def test_a_far_cpu_candidate_is_approached_through_a_stepping_stone(data, monkeypatch):
    """Memory that grows faster than linearly (a kept heap's fragmentation): the line through the two small
    probes predicts a pass that would peak far above the budget, which on the CPU means the OOM killer. The
    probe at half the candidate refits the line, so no step tried comes near that."""
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "data.path": "", "train.batch_size": 1000})
    budget = 20e9
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: int(budget / 0.8))
    tried = []

    def peak(examples):
        return 1e9 + 100e6 * examples + 0.5e6 * examples**2

    def convex_probe(cfg, device, examples, amp=None, repeats=2):
        tried.append(examples)
        return memory_plan.Probe(examples, int(peak(examples)), 1.0)
    monkeypatch.setattr(memory_plan, "probe", convex_probe)
    plan = memory_plan.plan_passes(cfg, CPU)
    straight_line = (budget - 0.996e9) // 103e6                   # the two small probes' prediction
    assert peak(straight_line) > 1.7 * budget
    assert tried[2] == straight_line // 2 and plan.probes[2].examples == tried[2]
    assert max(peak(n) for n in tried) < 1.15 * budget
    assert plan.planned.peak_bytes <= budget < peak(plan.examples_per_pass + 1) * 1.1
    assert [p.examples for p in plan.too_large] == tried[3:-1] != []              # and the plan says what it tried
    text = plan.describe(expected_batch=1000, steps_per_epoch=7)
    assert f"{tried[3]} examples: {peak(tried[3]) / 2**20:.0f} MiB, 1.00 s (too large)" in text


def test_the_stepping_stone_is_taken_only_for_a_candidate_far_beyond_the_larger_probe(data, monkeypatch):
    """Beyond 4 x 4 examples the stone (half the candidate) is at least 4 examples above the larger probe;
    nearer, its slope would be over an example or two, which a small network's allocator noise decides."""
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "data.path": "", "train.batch_size": 1000})
    tried = []

    def linear_probe(cfg, device, examples, amp=None, repeats=2):
        tried.append(examples)
        return memory_plan.Probe(examples, int(1e9 + 1e9 * examples), 1.0)
    monkeypatch.setattr(memory_plan, "probe", linear_probe)
    for fitting, expected in ((9, [2, 4, 9]), (16, [2, 4, 16]), (17, [2, 4, 8, 17])):
        tried.clear()
        monkeypatch.setattr(memory_plan, "free_memory", lambda device: int((fitting + 1.5) * 1e9 / 0.8))
        plan = memory_plan.plan_passes(cfg, CPU)
        assert tried == expected and plan.examples_per_pass == fitting and plan.too_large == ()


def test_the_cpu_memory_is_shared_by_the_runs_processes_on_the_node(monkeypatch):
    """torchrun's CPU processes on one node each run passes at once: each plans on its share of the memory."""
    monkeypatch.setattr(memory_plan, "_available_cpu_memory", lambda: 8 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory_plan.free_memory(CPU) == 8 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory_plan.free_memory(CPU) == 4 * 2**30
    assert memory_plan.processes_sharing_memory(torch.device("cuda", 0)) == 1   # each rank has its own GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        memory_plan.free_memory(CPU)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "3")     # ranks started by hand, no torchrun: all of them may be here
    assert memory_plan.processes_sharing_memory(CPU) == 3


def test_two_cpu_processes_on_a_node_plan_passes_that_fit_together(data, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "data.path": "", "train.batch_size": 1000})
    monkeypatch.setattr(memory_plan, "probe",
                        lambda cfg, device, examples, amp=None, repeats=2: memory_plan.Probe(
                            examples, int(1e9 + 1e9 * examples), 1.0))
    # the node: room for two processes' passes of 12 in 80% of it (1e9 fixed + 1e9 per example each)
    monkeypatch.setattr(memory_plan, "_available_cpu_memory", lambda: int(2 * 13.5e9 / 0.8))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = memory_plan.plan_passes(cfg, CPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    shared = memory_plan.plan_passes(cfg, CPU)
    assert shared.examples_per_pass == 12 and alone.examples_per_pass == 26
    assert "2 processes of the run on this node" in shared.describe(1000, 60)
    assert "processes of the run" not in alone.describe(1000, 60)


def _kept_memory_with_a_linear_probe(monkeypatch, free_bytes: float) -> list[int]:
    """The CPU with freed memory kept, probes costing 1e9 bytes + 1e9 per example, and free_bytes free."""
    tried = []

    def linear_probe(cfg, device, examples, amp=None, repeats=2):
        tried.append(examples)
        return memory_plan.Probe(examples, int(1e9 + 1e9 * examples), 1.0)
    monkeypatch.setattr(memory_plan, "measures_resident", lambda device: True)
    monkeypatch.setattr(memory_plan, "probe_step", lambda *a, **k: (lambda: None))
    monkeypatch.setattr(memory_plan, "probe", linear_probe)
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: int(free_bytes))
    return tried


def test_a_numeric_pass_with_freed_memory_kept_is_checked_warned_about_or_refused(data, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": 40, "dp.n_splits": 2})
    tried = _kept_memory_with_a_linear_probe(monkeypatch, 100e9)
    fits = memory_plan.check_fixed_pass(cfg, CPU, 20)           # 21e9 bytes of 100e9 free
    assert tried == [2, 4] and "passes of up to 20 examples need about 19.56 GiB" in fits and "OOM" not in fits
    assert memory_plan.check_fixed_pass(cfg, CPU, 4) is None    # no larger than the probes: nothing to learn
    _kept_memory_with_a_linear_probe(monkeypatch, 25e9)          # 21e9 > 80% of 25e9, < twice it
    warned = memory_plan.check_fixed_pass(cfg, CPU, 20)
    assert "the OOM killer may stop this run" in warned and "about 38 here, 19 examples a pass" in warned
    _kept_memory_with_a_linear_probe(monkeypatch, 10e9)          # 21e9 > twice 10e9
    with pytest.raises(ValueError, match="far more than there is; dp.max_physical_batch_size=auto"):
        memory_plan.check_fixed_pass(cfg, CPU, 20)
    monkeypatch.setattr(memory_plan, "measures_resident", lambda device: False)   # glibc's policy: not checked
    assert memory_plan.check_fixed_pass(cfg, CPU, 20) is None


def test_the_trainer_refuses_a_numeric_pass_far_beyond_memory_before_reading_the_data(data, tmp_path, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": 64, "data.path": str(tmp_path / "no_such_data")})
    _kept_memory_with_a_linear_probe(monkeypatch, 10e9)
    # a pass never holds more than the Poisson batch (expected 32 here): checked at its bound, 32 + 4 sqrt(32) + 1
    with pytest.raises(ValueError, match="passes of up to 56 examples need about"):
        Trainer(cfg, tmp_path / "run")
    _kept_memory_with_a_linear_probe(monkeypatch, 1000e9)
    run = Trainer(tiny_config(data, **{"dp.max_physical_batch_size": 64}), tmp_path / "run2")
    assert run.physical_batch_size == 64 and "passes of up to 56 examples need about 53.09 GiB" in run.memory_note


def test_the_largest_pass_is_bounded_by_the_public_expected_batch_per_process(data, monkeypatch):
    cfg = tiny_config(data, **{"train.batch_size": 4096, "dp.max_physical_batch_size": 8192, "dp.n_splits": 4})
    assert memory_plan.largest_pass(cfg) == 4096 + 256 + 1 and memory_plan.largest_pass(cfg, 2) == 2231
    tried = _kept_memory_with_a_linear_probe(monkeypatch, 1e15)
    small = tiny_config(data, **{"train.batch_size": 2})      # passes of at most 2 + 4 sqrt(2) + 1 = 9 examples
    assert "passes of up to 9 examples" in memory_plan.check_fixed_pass(small, CPU, 2048) and tried == [2, 4]


def test_the_probes_of_a_memory_check_leave_no_path_choices_behind(data, monkeypatch):
    from dpdm_fast.engine import autotune
    monkeypatch.setattr(memory_plan, "measures_resident", lambda device: True)
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 2**40)
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": 16})
    autotune.clear_cache()
    assert memory_plan.check_fixed_pass(cfg, CPU, 16) is not None      # real probe steps of the tiny network
    assert autotune._CHOICES == {}


def test_not_even_one_example_fitting_is_a_clear_error(data, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto"})
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 1000)
    with pytest.raises(RuntimeError, match="not even one example fits"):
        memory_plan.plan_passes(cfg, CPU)


def test_auto_and_memory_fraction_are_validated(data):
    validate_counts(tiny_config(data, **{"dp.max_physical_batch_size": "auto"}))
    with pytest.raises(ConfigError, match='or "auto"'):
        validate_counts(tiny_config(data, **{"dp.max_physical_batch_size": "big"}))
    with pytest.raises(ConfigError, match="memory_fraction"):
        validate_counts(tiny_config(data, **{"dp.memory_fraction": 1.5}))


def test_the_trainer_uses_the_plan_and_a_resumed_run_keeps_its_pass_size(data, tmp_path, monkeypatch):
    cfg = tiny_config(data, **{"dp.max_physical_batch_size": "auto", "train.snapshot_freq": 1000})
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 100 * 2**20)   # a small machine
    trainer = Trainer(cfg, tmp_path, max_steps=1, progress=False)
    assert trainer.physical_batch_size == trainer.pass_plan.examples_per_pass < 32    # several passes per step
    size = trainer.physical_batch_size
    assert trainer.run().step == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["examples_per_pass"] == size

    def no_probe(*a, **k):
        raise AssertionError("a resumed run must not probe again")
    monkeypatch.setattr("dpdm_fast.training.loop.plan_passes", no_probe)
    resumed = Trainer(cfg, tmp_path, max_steps=2, resume=True, progress=False)
    assert resumed.physical_batch_size == size and resumed.replan_note is None and resumed.run().step == 2
    record = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["pass_memory"]
    assert record == trainer.pass_plan.record() and record["device"] == "cpu"   # carried over by the resume

    # resumed where that pass no longer fits (a smaller device): planned anew, and said so
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: int(record["peak_bytes"]))   # 80% of it: too small
    smaller = _fake_plan(examples=size - 1, peak_bytes=record["peak_bytes"] // 2)
    monkeypatch.setattr("dpdm_fast.training.loop.plan_passes", lambda *a, **k: smaller)
    replanned = Trainer(cfg, tmp_path, max_steps=3, resume=True, progress=False)
    assert replanned.physical_batch_size == size - 1 and "planned anew" in replanned.replan_note
    assert replanned.run().step == 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["pass_memory"] == smaller.record()


def _fake_plan(examples: int, peak_bytes: int, device: str = "cpu") -> memory_plan.PassPlan:
    planned = memory_plan.Probe(examples, peak_bytes, 1.0)
    return memory_plan.PassPlan(device, examples, 1.0, 0.0, 2 * peak_bytes, 0.8, 0.1, 0.1, (planned,), planned)


def test_a_saved_pass_is_reused_only_on_the_same_kind_of_device_with_room_for_it(monkeypatch):
    record = _fake_plan(examples=8, peak_bytes=8 * 2**30, device="cuda:0").record()
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 20 * 2**30)
    assert memory_plan.why_saved_pass_misfits(record, torch.device("cuda:1"), 0.5) is None      # 8 <= 10 GiB
    assert "above 30%" in memory_plan.why_saved_pass_misfits(record, torch.device("cuda:0"), 0.3)  # 8 > 6 GiB
    assert "planned on cuda:0" in memory_plan.why_saved_pass_misfits(record, CPU, 0.9)
    assert memory_plan.why_saved_pass_misfits(None, CPU, 0.9) is None   # an older checkpoint: kept as before


def test_info_prints_the_plan_and_the_time_per_epoch(data, capsys, monkeypatch):
    from dpdm_fast.cli import main
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 100 * 2**20)
    overrides = [o for o in tiny_config.__globals__["tiny_overrides"](data) if not o.startswith("data.public_size")]
    assert main(["info", "configs/mnist_28/train_eps_10.0.yaml", *overrides, "data.public_size=200",
                 "dp.max_physical_batch_size=auto"]) == 0
    out = capsys.readouterr().out
    assert "dp.max_physical_batch_size: auto) on cpu: passes of" in out and "an epoch (7 steps) about" in out


def test_a_cpu_run_that_keeps_freed_memory_replans_a_pass_measured_as_tensors(monkeypatch):
    """A checkpoint planned under glibc's own policy counts the tensors' peak; with freed memory kept the
    heap's fragmentation is resident too (1.46x at the published MNIST pass), so the pass is measured anew."""
    from dpdm_fast.engine import cpu_allocator
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 100 * 2**30)
    tensors = _fake_plan(examples=8, peak_bytes=2**30, device="cpu").record()
    resident = dict(tensors, resident=True)
    assert memory_plan.why_saved_pass_misfits(tensors, CPU, 0.8) is None            # not keeping: as before
    monkeypatch.setattr(cpu_allocator, "is_keeping_freed_memory", lambda: True)
    assert "measured anew" in memory_plan.why_saved_pass_misfits(tensors, CPU, 0.8)
    assert memory_plan.why_saved_pass_misfits(resident, CPU, 0.8) is None
    assert memory_plan.why_saved_pass_misfits(dict(tensors, device="cuda:0"), torch.device("cuda:0"), 0.8) is None
