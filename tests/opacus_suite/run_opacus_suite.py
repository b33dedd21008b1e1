#!/usr/bin/env python
"""Run Opacus's own PrivacyEngine / BatchMemoryManager / Poisson / data-loader tests against dpdm_fast.

What it does
------------
1. Finds the installed ``opacus`` package and its ``opacus/tests/`` folder.
2. Copies ``privacy_engine_test.py``, ``batch_memory_manager_test.py``, ``poisson_test.py``,
   ``dpdataloader_test.py`` and the local helpers they import (``from .utils import ...`` ->
   ``utils.py``) into a fresh package in a temporary directory.
3. Applies the import swaps in ``REWRITES`` (unless ``--opacus``), writes a ``conftest.py`` (the
   torchvision shim, the thread count, the hypothesis profile) and a minimal ``pytest.ini``.
4. Runs ``python -m pytest -q -rA -p no:cacheprovider --junitxml ...`` on the copies (niced) and
   summarises the junit xml: per-file counts and, per non-passing test, its id and the first line
   of its error, also grouped by that first line. Printed and written to ``--out``.

The rewrites (each pattern must match exactly once, or the script stops: a newer Opacus changed
its tests and the table needs a look)
------------------------------------------------------------------------------------------------
privacy_engine_test.py
    ``from opacus import PrivacyEngine`` -> ``from dpdm_fast import PrivacyEngine``
    (the object under test; everything else it imports -- DPMultiheadAttention, _generate_noise,
    the schedulers, are_state_dict_equal, ModuleValidator, UnsupportedModuleError -- stays Opacus's:
    dpdm_fast has no public equivalent of those, and uses Opacus's accountants itself.)
batch_memory_manager_test.py
    ``from opacus import PrivacyEngine`` -> ``from dpdm_fast import PrivacyEngine``
    ``from opacus.utils.batch_memory_manager import BatchMemoryManager``
        -> ``from dpdm_fast import BatchMemoryManager``
dpdataloader_test.py
    ``DPDataLoader`` -> ``dpdm_fast.engine.PoissonDataLoader`` (imported *as* ``DPDataLoader``;
    it is dpdm_fast's public Poisson loader, a subclass of Opacus's DPDataLoader with its own
    sampler and a ledger of the batch sizes it hands out). ``CollateFnWithEmpty`` / ``wrap_collate_with_empty`` stay Opacus's
    (dpdm_fast has no equivalent; its loader inherits them). The test's
    ``assertLogs("opacus.data_loader")`` still applies, since the warnings come from the inherited code.
poisson_test.py
    ``UniformWithReplacementSampler`` -> ``dpdm_fast.engine.sampling.poisson.PoissonBatchSampler`` (imported
    *as* the Opacus name; dpdm_fast's own Poisson batch sampler, same keyword arguments).

Environment
-----------
* torchvision (privacy_engine_test.py uses ``torchvision.models`` and ``FakeData``) must be the
  version built for the installed torch; for torch 2.13.0:
      pip install --no-deps torchvision==0.28.0
  PyPI's wheel is a CUDA build whose ``_C.so`` cannot load beside the CPU torch, and
  ``torchvision/_meta_registrations.py`` then fails at import (``operator torchvision::nms does not
  exist``: it registers a fake kernel for an op that was never defined). ``TORCHVISION_SHIM`` below
  (run in conftest.py before the tests import torchvision) first tries a plain ``import
  torchvision``; only if that fails with that error does it drop the half-imported modules, put an
  empty module in ``sys.modules['torchvision._meta_registrations']`` and import again. Only the
  meta (fake-tensor) kernels of the detection ops (nms, roi_align, ...) are lost; models, datasets
  and transforms work. Nothing in site-packages is edited. If torchvision is missing the script
  says how to install it and exits with status 2.
* hypothesis: the tests' own ``@settings`` are used; the conftest only loads a profile with
  ``database=None`` (no .hypothesis/ directory, no replay of old failures) and, with
  ``--max-examples N`` (N > 0), ``max_examples=N``, which caps ``test_noise_level`` (float
  strategy, 100 examples by default: 23-43 s per ConvNet class) and friends. The cap is stated in
  the summary. Not capped by default: on 2 CPU cores the baseline (opacus 1.6.0, 288 tests) took
  about 7 min and the swapped run about 9.5 min; much longer when the cores are busy.
* torch threads: ``--threads`` (default 2); pytest runs under ``nice`` (``--nice``, default 10).

Usage
-----
    python tests/opacus_suite/run_opacus_suite.py                  # swapped, -> RESULTS.md
    python tests/opacus_suite/run_opacus_suite.py --opacus         # baseline, -> RESULTS_opacus.md
    python tests/opacus_suite/run_opacus_suite.py --both           # both, marks inherited failures
    ... --max-examples 5 -k "ConvNet and not Functorch" --keep --files privacy_engine_test.py
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

TEST_FILES = ["privacy_engine_test.py", "batch_memory_manager_test.py", "poisson_test.py",
              "dpdataloader_test.py", "gradient_accumulation_test.py", "privacy_engine_validation_test.py",
              "accounting_noise_multiplier_test.py", "schedulers/grad_clip_scheduler_test.py",
              "schedulers/noise_scheduler_test.py"]
# Opacus's per-layer grad-sampler tests, run through ADAPTER: the per-sample gradients come from dpdm_fast's
# engine (p.grad_sample after one backward of a PrivateModule) instead of Opacus's GradSampleModule.
# (embedding_norm_sample_test.py tests Opacus's ghost-norm internals, which have no dpdm_fast counterpart.)
GRAD_SAMPLE_FILES = [f"grad_samples/{n}_test.py" for n in (
    "conv1d", "conv2d", "conv3d", "dp_multihead_attention", "dp_rnn", "embedding_bag", "embedding", "group_norm",
    "instance_norm1d", "instance_norm2d", "instance_norm3d", "layer_norm", "linear", "rms_norm", "sequence_bias")]
ALL_FILES = TEST_FILES + GRAD_SAMPLE_FILES

ADAPTER = '''"""dpdm_fast in place of Opacus's GradSampleModule in Opacus's grad_samples tests (written by run_opacus_suite.py)."""
import numpy as np
import torch
from opacus.utils.per_sample_gradients_utils import (ModelWithLoss, clone_module, compute_microbatch_grad_sample,
                                                     is_batch_empty, trainable_parameters, unpack_packedsequences)
from torch.nn.utils.rnn import PackedSequence

from dpdm_fast.engine import PrivateModule


def compute_opacus_grad_sample(x, module, batch_first=True, loss_reduction="mean", grad_sample_mode="hooks"):
    """One backward of the engine's private module; p.grad_sample of every trainable parameter (every
    grad_sample_mode is the engine's one computation). Clipping is irrelevant here: grad_sample is pre-clip."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = clone_module(module)
    private = PrivateModule(model, max_grad_norm=1.0, loss_reduction=loss_reduction, batch_first=batch_first)
    try:
        loss = ModelWithLoss(private, loss_reduction)(x)
        loss.backward()
        return {name: p.grad_sample for name, p in trainable_parameters(model)}
    finally:
        private.remove_hooks()


def compute_grad_samples_microbatch_and_opacus(x, module, batch_first=True, loss_reduction="mean",
                                               grad_sample_mode="hooks", chunk_method=iter):
    if type(x) is PackedSequence:
        micro = compute_microbatch_grad_sample(unpack_packedsequences(x), module, batch_first=batch_first,
                                               loss_reduction=loss_reduction, chunk_method=chunk_method)
    elif not is_batch_empty(x):
        micro = compute_microbatch_grad_sample(x, module, batch_first=batch_first, loss_reduction=loss_reduction,
                                               chunk_method=chunk_method)
    else:
        raise RuntimeError("x is expected to be non-empty.")
    ours = compute_opacus_grad_sample(x, module, batch_first=batch_first, loss_reduction=loss_reduction,
                                      grad_sample_mode=grad_sample_mode)
    if micro.keys() != ours.keys():
        raise ValueError(f"Keys not matching: {sorted(micro.keys() ^ ours.keys())}")
    return micro, ours
'''

# (file, exact pattern, replacement). Each pattern must occur exactly once in its file.
REWRITES: list[tuple[str, str, str]] = [
    ("privacy_engine_test.py",
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("batch_memory_manager_test.py",
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("batch_memory_manager_test.py",
     "from opacus.utils.batch_memory_manager import BatchMemoryManager\n",
     "from dpdm_fast import BatchMemoryManager\n"),
    ("dpdataloader_test.py",
     "from opacus.data_loader import CollateFnWithEmpty, DPDataLoader, wrap_collate_with_empty\n",
     "from opacus.data_loader import CollateFnWithEmpty, wrap_collate_with_empty\n"
     "from dpdm_fast.engine import PoissonDataLoader as DPDataLoader\n"),
    ("poisson_test.py",
     "from opacus.utils.uniform_sampler import UniformWithReplacementSampler\n",
     "from dpdm_fast.engine.sampling.poisson import PoissonBatchSampler as UniformWithReplacementSampler\n"),
    ("gradient_accumulation_test.py",
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("gradient_accumulation_test.py",
     "from opacus.utils.batch_memory_manager import BatchMemoryManager\n",
     "from dpdm_fast import BatchMemoryManager\n"),
    ("privacy_engine_validation_test.py",
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("accounting_noise_multiplier_test.py",   # (its AdaClipDPOptimizer/DPOptimizer built by hand stay Opacus's)
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("grad_clip_scheduler_test.py",
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("noise_scheduler_test.py",
     "from opacus import PrivacyEngine\n",
     "from dpdm_fast import PrivacyEngine\n"),
    ("common.py",
     "    compute_grad_samples_microbatch_and_opacus,\n    compute_opacus_grad_sample,\n    is_batch_empty,\n)\n",
     "    is_batch_empty,\n)\nfrom .dpdm_fast_adapter import compute_grad_samples_microbatch_and_opacus, "
     "compute_opacus_grad_sample\n"),
]

# Opacus names that must no longer be imported by a swapped file (a check on the table above).
MUST_BE_GONE = [r"^from opacus import PrivacyEngine\b", r"^from opacus\.utils\.batch_memory_manager import",
                r"^from opacus\.data_loader import .*\bDPDataLoader\b",
                r"^from opacus\.utils\.uniform_sampler import UniformWithReplacementSampler"]

TORCHVISION_INSTALL = "pip install --no-deps torchvision==0.28.0   # the torchvision built for torch 2.13.0"

TORCHVISION_SHIM = '''
def _import_torchvision_without_meta_registrations():
    """Import torchvision; if its compiled ops are unavailable (PyPI's CUDA wheel beside a CPU
    torch), skip torchvision._meta_registrations, whose unguarded register_fake('torchvision::nms')
    otherwise raises 'operator torchvision::nms does not exist'."""
    import sys, types
    try:
        import torchvision  # noqa: F401
        return "plain import"
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        first_error = str(exc)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401
    return "shim (skipped torchvision._meta_registrations: " + first_error + ")"
'''

CONFTEST = '''"""Generated by tests/opacus_suite/run_opacus_suite.py."""
import os

import torch
from hypothesis import settings
{shim}
TORCHVISION_MODE = _import_torchvision_without_meta_registrations()
torch.set_num_threads(int(os.environ.get("OPACUS_SUITE_THREADS", "2")))

_cap = int(os.environ.get("OPACUS_SUITE_MAX_EXAMPLES", "0"))
settings.register_profile("opacus_suite", **({{"max_examples": _cap}} if _cap > 0 else {{}}), database=None)
settings.load_profile("opacus_suite")


def pytest_report_header(config):
    return [f"torchvision import: {{TORCHVISION_MODE}}", f"hypothesis max_examples cap: {{_cap or 'none'}}"]
'''

PYTEST_INI = "[pytest]\n"  # isolates the run from the repository's pytest.ini (addopts, markers)


# ---------------------------------------------------------------------------------------------
def opacus_tests_dir() -> Path:
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("opacus is not installed in this interpreter (" + sys.executable + ")")
    d = Path(list(spec.submodule_search_locations)[0]) / "tests"
    if not d.is_dir():
        sys.exit(f"{d} not found: this opacus installation has no tests folder")
    return d


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "?"


def check_torchvision() -> str:
    if importlib.util.find_spec("torchvision") is None:
        print("torchvision is not installed; privacy_engine_test.py needs it (models, FakeData).\n"
              f"Install it into this interpreter with:\n    {sys.executable} -m {TORCHVISION_INSTALL}\n"
              f"(installed torch: {package_version('torch')}; --no-deps so that it does not pull another torch; "
              "for another torch use the torchvision release whose Requires-Dist names that torch)", file=sys.stderr)
        sys.exit(2)
    code = TORCHVISION_SHIM + ("\nmode = _import_torchvision_without_meta_registrations()\n"
                               "from torchvision import models, transforms\nfrom torchvision.datasets import FakeData\n"
                               "import torchvision\nprint(torchvision.__version__, '|', mode)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        print("torchvision is installed but cannot be imported, even with the shim:\n"
              + r.stderr.strip().splitlines()[-1] + "\n"
              f"Reinstall the version matching torch {package_version('torch')}, e.g.\n    {TORCHVISION_INSTALL}",
              file=sys.stderr)
        sys.exit(2)
    return r.stdout.strip()


def local_helpers(src: str) -> list[str]:
    return [m + ".py" for m in re.findall(r"^from \.(\w+) import", src, flags=re.M)]


def prepare(tmp: Path, src_dir: Path, files: list[str], swap: bool) -> Path:
    """Copies the files (and their local helpers) into one flat package; the rewrites are keyed by file name."""
    pkg = tmp / ("opacus_suite_swapped" if swap else "opacus_suite_baseline")
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if swap:
        (pkg / "dpdm_fast_adapter.py").write_text(ADAPTER)
    todo, done = list(files), set()
    while todo:
        rel = todo.pop(0)
        if rel in done:
            continue
        done.add(rel)
        name = Path(rel).name
        text = (src_dir / rel).read_text()
        folder = str(Path(rel).parent)
        todo += [h if folder == "." else f"{folder}/{h}" for h in local_helpers(text)]
        if swap:
            for fname, pattern, repl in REWRITES:
                if fname != name:
                    continue
                n = text.count(pattern)
                if n != 1:
                    sys.exit(f"rewrite table out of date: {pattern!r} occurs {n} times in {name} (expected 1)")
                text = text.replace(pattern, repl)
            if rel in TEST_FILES:
                for pat in MUST_BE_GONE:
                    if re.search(pat, text, flags=re.M):
                        sys.exit(f"{name} still imports an Opacus name meant to be swapped ({pat})")
        (pkg / name).write_text(text)
    (tmp / "conftest.py").write_text(CONFTEST.format(shim=TORCHVISION_SHIM))
    (tmp / "pytest.ini").write_text(PYTEST_INI)
    return pkg


def run_pytest(tmp: Path, pkg: Path, files: list[str], args) -> tuple[Path, float, int]:
    xml = tmp / f"{pkg.name}.xml"
    log = tmp / f"{pkg.name}.log"
    cmd = [sys.executable, "-m", "pytest", *[str(pkg / Path(f).name) for f in files], "-q", "-rA",
           "-p", "no:cacheprovider", "-c", str(tmp / "pytest.ini"), "--rootdir", str(tmp),
           f"--junitxml={xml}", "-o", "junit_family=xunit2"]
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.pytest_args
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OPACUS_SUITE_MAX_EXAMPLES"] = str(args.max_examples)
    env["OPACUS_SUITE_THREADS"] = str(args.threads)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env["PYTHONUNBUFFERED"] = "1"  # live progress through the pipe
    print(f"\n$ {' '.join(cmd)}\n", flush=True)
    t0 = time.time()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None)
        in_passes = False  # the -rA "PASSES" section (captured output of passing tests) goes to the log only
        for line in p.stdout:
            lf.write(line)
            if line.startswith("=") and " PASSES " in line:
                in_passes = True
            elif line.startswith("=") and line.rstrip().endswith("="):
                in_passes = False
            if args.verbose or not (in_passes or line.startswith("PASSED ")):
                sys.stdout.write(line)
        rc = p.wait()
    return xml, time.time() - t0, rc


# ---------------------------------------------------------------------------------------------
def first_line(msg: str | None, limit: int = 220) -> str:
    for line in (msg or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[:limit] + "..."
    return "(no message)"


def parse_junit(xml: Path, pkg_name: str) -> list[dict]:
    if not xml.exists():
        return []
    out = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        cls = tc.get("classname", "")
        parts = cls.split(".")
        if parts and parts[0] == pkg_name:
            parts = parts[1:]
        file = (parts[0] + ".py") if parts else "?"
        tid = "::".join([file] + parts[1:] + [tc.get("name", "?")])
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = el.get("message") or (el.text or "")
                if tag == "skipped" and el.get("type") == "pytest.xfail":
                    status = "xfailed"
                break
        out.append(dict(id=tid, file=file, status=status, msg=first_line(msg), time=float(tc.get("time", 0))))
    return out


def summarise(title: str, results: list[dict], wall: float, rc: int, files: list[str],
              baseline: dict[str, str] | None = None) -> str:
    statuses = ["passed", "failed", "error", "skipped", "xfailed"]
    lines = [f"## {title}", "", f"wall time {wall:.0f} s, pytest exit status {rc}", ""]
    if not results:
        return "\n".join(lines + ["**no junit results** (collection crashed? see the log above)", ""])
    lines += ["| file | " + " | ".join(statuses) + " | time (s) |", "|---" * (len(statuses) + 2) + "|"]
    tot = {s: 0 for s in statuses}
    for f in files + ["TOTAL"]:
        rs = [r for r in results if f == "TOTAL" or r["file"] == Path(f).name]
        c = {s: sum(r["status"] == s for r in rs) for s in statuses}
        if f != "TOTAL":
            for s in statuses:
                tot[s] += c[s]
        name = f"**{f}**" if f == "TOTAL" else f
        lines.append(f"| {name} | " + " | ".join(str(c[s]) for s in statuses)
                     + f" | {sum(r['time'] for r in rs):.0f} |")
    lines.append("")

    def tag(r):
        if baseline is None:
            return ""
        b = baseline.get(r["id"])
        return " *(also on Opacus)*" if b in ("failed", "error") else (" *(Opacus: " + b + ")*" if b and b != "passed" else "")

    bad = [r for r in results if r["status"] in ("failed", "error")]
    if bad:
        lines += ["### Failures and errors, grouped by the first line of the error", ""]
        groups: "OrderedDict[str, list[dict]]" = OrderedDict()
        for r in bad:
            groups.setdefault(r["msg"], []).append(r)
        for msg, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- **{len(rs)}x** `{msg}`")
            for r in rs:
                lines.append(f"  - {r['status']}: `{r['id']}`{tag(r)}")
        lines.append("")
    skipped = [r for r in results if r["status"] in ("skipped", "xfailed")]
    if skipped:
        lines += ["### Skipped, grouped by reason", ""]
        reasons: "OrderedDict[str, list[dict]]" = OrderedDict()
        for r in skipped:
            reasons.setdefault(r["msg"], []).append(r)
        for msg, rs in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- **{len(rs)}x** {msg}: " + ", ".join(f"`{r['id']}`" for r in rs))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--opacus", action="store_true", help="baseline: run the unmodified tests against Opacus")
    mode.add_argument("--both", action="store_true", help="baseline then swapped; marks inherited failures")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown summary (default tests/opacus_suite/RESULTS.md, RESULTS_opacus.md with --opacus)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (copies, xml, log)")
    ap.add_argument("-k", default=None, help="passed to pytest -k")
    ap.add_argument("--files", nargs="+", default=ALL_FILES, choices=ALL_FILES, help="subset of test files")
    ap.add_argument("--max-examples", type=int, default=0,
                    help="cap hypothesis max_examples (default 0 = as the tests define them, i.e. hypothesis's 100; "
                         "e.g. 5 for a quick look)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the pytest process (default 2)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the pytest process (default 10; 0 = off)")
    ap.add_argument("-v", "--verbose", action="store_true", help="also echo PASSED/SKIPPED lines of -rA")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()

    src_dir = opacus_tests_dir()
    tv = check_torchvision()
    out = args.out or HERE / ("RESULTS_opacus.md" if args.opacus else "RESULTS.md")
    modes = [False] if args.opacus else ([False, True] if args.both else [True])

    try:  # read-only git queries (GIT_OPTIONAL_LOCKS=0: git status does not refresh the index)
        genv = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, env=genv).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "dpdm_fast"],
                               capture_output=True, text=True, env=genv).stdout.splitlines()
        git += f", {len(dirty)} uncommitted change(s) under dpdm_fast/" if dirty else ", dpdm_fast/ clean"
    except OSError:
        git = "?"
    header = [
        "# Opacus's own tests against dpdm_fast", "",
        f"- run: {_dt.datetime.now().isoformat(timespec='seconds')}, "
        f"mode: {'baseline (unmodified, Opacus)' if args.opacus else 'baseline + swapped' if args.both else 'swapped (dpdm_fast)'}",
        f"- opacus {package_version('opacus')} tests from `{src_dir}`; torch {package_version('torch')}; "
        f"torchvision {tv}; hypothesis {package_version('hypothesis')}",
        f"- dpdm_fast from `{REPO}` (git HEAD {git} at the start of the run)",
        f"- hypothesis max_examples: {'capped at ' + str(args.max_examples) + ' (--max-examples)' if args.max_examples > 0 else 'as the tests define them (not capped)'}",
        f"- files: {', '.join(args.files)}" + (f"; -k `{args.k}`" if args.k else "")
        + (f"; extra pytest args `{' '.join(args.pytest_args)}`" if args.pytest_args else ""),
        f"- torch threads {args.threads}, nice {args.nice}",
        "- swaps: " + ("none (baseline)" if args.opacus else "; ".join(
            f"{f}: `{p.strip()}` -> `{r.strip().replace(chr(10), '; ')}`" for f, p, r in REWRITES)),
        "",
    ]
    sections, baseline, worst_rc = [], None, 0
    for swap in modes:
        tmp = Path(tempfile.mkdtemp(prefix="opacus_suite_"))
        try:
            pkg = prepare(tmp, src_dir, args.files, swap)
            xml, wall, rc = run_pytest(tmp, pkg, args.files, args)
            results = parse_junit(xml, pkg.name)
            title = "Swapped: dpdm_fast" if swap else "Baseline: unmodified tests against Opacus"
            sections.append(summarise(title, results, wall, rc, args.files, baseline if swap else None))
            if not swap:
                baseline = {r["id"]: r["status"] for r in results}
            worst_rc = max(worst_rc, rc if rc in (0, 1) else 2)
        finally:
            if args.keep:
                print(f"kept {tmp}", flush=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    report = "\n".join(header) + "\n" + "\n".join(sections)
    print("\n" + report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
    return worst_rc


if __name__ == "__main__":
    sys.exit(main())
