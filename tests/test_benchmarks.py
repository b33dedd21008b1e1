"""The benchmark harness itself: every engine runs, failures are reported, outputs are written."""
import json

import torch

from dpdm_fast.benchmarks import build_engine
from dpdm_fast.benchmarks.measure import time_cell
from dpdm_fast.benchmarks.report import write_outputs
from dpdm_fast.benchmarks.runner import run_grid


def test_quick_grid_writes_json_table_and_plot(tmp_path):
    result = run_grid(["nonprivate", "dpdm_fast", "opacus_kavg"], ["mnist"], [(1, 2)], repeats=1, memory=False,
                      log=lambda *a: None)
    cells = {c["engine"]: c for c in result["cells"]}
    assert all(c["status"] == "ok" for c in cells.values())
    assert cells["nonprivate"]["x_nonprivate"] == 1.0 and cells["opacus_kavg"]["speedup_vs_opacus_kavg"] == 1.0
    assert cells["dpdm_fast"]["rows_per_s"] == 2 * cells["dpdm_fast"]["examples_per_s"]
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["machine"]["torch"] == torch.__version__ and len(data["cells"]) == 3
    table = paths["table"].read_text()
    assert "| mnist | 1 | 2 | dpdm_fast |" in table
    assert paths["plot"] is not None and paths["plot"].stat().st_size > 1000


def test_failing_engine_is_reported_not_dropped(monkeypatch):
    from dpdm_fast.benchmarks import engines

    def broken(*args):
        raise NotImplementedError("no rule for this layer")
    monkeypatch.setitem(engines.ENGINES, "broken", (broken, "always fails"))
    out = time_cell(["nonprivate", "broken"], "mnist", 1, 1, 1, "cpu")
    assert out["nonprivate"]["status"] == "ok"
    assert out["broken"]["status"].startswith("failed: NotImplementedError")


def test_all_engines_build_and_step_on_celeba():
    for engine in ["dpdm_fast", "opacus_ghost", "functorch"]:
        step, nparams = build_engine(engine, "celeba", 1, 1)
        step()
        assert nparams == 1_804_451


def test_cpu_peak_memory_counts_the_per_example_buffer():
    from dpdm_fast.benchmarks.measure import peak_memory_here
    from dpdm_fast.engine.capture.autotune import force_path
    plain = peak_memory_here("nonprivate", "mnist", 2, 1, "cpu")
    # The conv path the autotuner picks depends on timings, and the unfold / grouped paths have
    # activation-sized temporaries of their own; the loop path has none, so the extra memory
    # measured here is the per-example buffer itself.
    with force_path("conv2d", "loop"):
        private = peak_memory_here("dpdm_fast", "mnist", 2, 1, "cpu")
    assert plain["status"] == private["status"] == "ok"
    assert plain["peak_bytes"] > 3 * 1_753_345 * 4  # weights, grads and Adam's two moments at least
    buffer = 2 * 1_753_345 * 4
    assert 0.5 * buffer < private["peak_bytes"] - plain["peak_bytes"] < 1.5 * buffer


def test_isolated_timing_runs_each_engine_in_its_own_process():
    from dpdm_fast.benchmarks.measure import time_cell_isolated
    out = time_cell_isolated(["nonprivate", "dpdm_fast"], "mnist", 1, 1, rounds=2, device="cpu", threads=1)
    assert all(r["status"] == "ok" and len(r["times_s"]) == 2 for r in out.values())


def test_grid_reports_too_slow_and_too_big_cells_instead_of_running_them(tmp_path, monkeypatch):
    """A cell the time or memory budget rules out is in the table and the plot with the reason."""
    from dpdm_fast.benchmarks import runner
    from dpdm_fast.benchmarks.measure import _summary
    # injected timings (10 ms per row): the verdicts must not depend on how fast or loaded this machine is
    monkeypatch.setattr(runner, "time_cell", lambda engines, w, B, K, repeats, device:
                        {e: _summary([0.01 * B * K] * repeats) for e in engines})
    monkeypatch.setattr(runner.Budget, "_memory_estimate",
                        lambda self, w, e, B, K, params: 10 * 2**30 if e == "opacus_kavg" and B * K > 2 else 0)
    monkeypatch.setattr(runner, "_available_bytes", lambda: 8 * 2**30)
    partial = []     # what a run cut off after each row has kept (the GPU script's grid runs under a limit)
    result = run_grid(["nonprivate", "dpdm_fast", "opacus_kavg"], ["small"], [(2, 2), (1, 2), (64, 32)],
                      repeats=1, memory=False, max_step_s=2.0, log=lambda *a: None, on_row=partial.append)
    assert [len(p["cells"]) for p in partial] == [3, 6, 9] and partial[-1] == result
    by = {(c["B"], c["K"], c["engine"]): c for c in result["cells"]}
    assert [(c["B"], c["K"]) for c in result["cells"]][::3] == [(1, 2), (2, 2), (64, 32)]  # by rows
    assert by[(1, 2, "opacus_kavg")]["status"] == "ok"
    assert by[(2, 2, "opacus_kavg")]["status"].startswith("out of memory: not run (~10.0 GiB estimated")
    for e in ("nonprivate", "dpdm_fast"):   # 2048 rows at the seconds per row of the 4-row cell: 20.5 s > 2 s
        assert by[(64, 32, e)]["status"] == "too slow: not run (~20.5 s per step extrapolated, limit 2 s)"
    assert by[(2, 2, "dpdm_fast")]["status"] == "ok"     # 4 rows: 0.04 s, within the limit
    paths = write_outputs(result, tmp_path)
    table = paths["table"].read_text()
    assert "| small | 64 | 32 | 2048 | too slow: not run |" in table
    assert "| small | 2 | 2 | 4 |" in table and "out of memory: not run" in table
    assert paths["plot"] is not None


def test_full_grid_is_every_batch_with_every_k():
    from dpdm_fast.benchmarks.runner import FULL_GRID
    from dpdm_fast.cli import _grid
    assert _grid("full") == FULL_GRID and len(FULL_GRID) == 16 and (1024, 32) in FULL_GRID and (16, 1) in FULL_GRID


def test_distributed_mode_times_one_and_two_processes_and_the_all_reduce(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "dpdm_fast.cli", "bench", "--distributed", "2", "--workloads", "small",
                          "--grid", "4x2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "distributed.json").read_text())
    (cell,) = result["cells"]
    assert result["processes"] == 2 and result["backend"] == "gloo" and (cell["B"], cell["K"]) == (4, 2)
    assert cell["one_process_s"] > 0 and cell["distributed_s"] > 0 and 0 < cell["all_reduce_alone_s"] < cell["distributed_s"]
    assert cell["efficiency"] == cell["one_process_s"] / (2 * cell["distributed_s"])
    assert cell["flat_bytes"] == 4 * cell["params"]
    assert cell["max_weight_difference"] < 1e-5   # the 2-process engine did the 1-process engine's steps
    assert "| 4 x 2 |" in (tmp_path / "distributed.md").read_text()


def test_lstm_lm_workload_engines_agree_on_the_clipped_noise_free_update():
    """The tied-embedding LSTM workload: the engines build and step, and dpdm_fast, Opacus hooks +
    K-averaging and the per-example loop give the same noise-free clipped update."""
    import torch
    from dpdm_fast.benchmarks.engines import WORKLOADS, lm_row_losses, make_batch
    from dpdm_fast.engine.reference import opacus_k_averaged_update, per_example_loop_update
    for engine in ["nonprivate", "dpdm_fast", "opacus_kavg"]:
        step, nparams = build_engine(engine, "lstm_lm", 2, 2)
        step()
        assert nparams == 256 * 128 + 4 * (128 * 128 * 2 + 2 * 128)   # the tied weight counted once
    torch.manual_seed(0)
    _, rows = make_batch(WORKLOADS["lstm_lm"], 2, 2, torch.device("cpu"))
    ours = per_example_loop_update(WORKLOADS["lstm_lm"].make_net(), lm_row_losses, rows, 2, 0.5, 2)
    torch.manual_seed(0)
    assert torch.allclose(ours, opacus_k_averaged_update(WORKLOADS["lstm_lm"].make_net(), lm_row_losses, rows, 2,
                                                         0.5, 2), atol=1e-6)
    from engine_helpers import flat_grad, rel, zero_noise_engine
    torch.manual_seed(0)
    net = WORKLOADS["lstm_lm"].make_net()
    pm, opt = zero_noise_engine(net, 2, 0.5, 2)
    lm_row_losses(pm, *rows).mean().backward()
    opt.step()
    assert rel(flat_grad(net), ours) < 1e-5
