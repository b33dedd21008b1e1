"""What the lent GPU machine lacks, made ready to carry: wheels of the requirements its image does not hold,
and MNIST. Run it here before the one prepared GPU run (``bench/gpu_check.sh``):

    python bench/gpu_carry.py            # .whl/ and shared/data/mnist in this checkout, both git-excluded
    # then, with the device tool: run(command="bash bench/gpu_check.sh /tmp/gpu --bundle $OUT/gpu_check.tgz", carry=[".whl", "shared"], timeout_s=570)

The device machine reaches no network and its image (torch, Triton, numpy, scipy, matplotlib, pytest, ...)
has no omegaconf, kornia or Opacus: without them every section past the kernel tests would fail at its
first import, a lost lease. ``gpu_check.sh`` installs ``.whl/*.whl`` and then runs ``--check`` here,
which stops the run at once, naming what is missing, instead of spending the GPU's minutes on failures.
``tests/test_gpu_check.py`` keeps ``CARRIED`` in step with ``setup.py``: a new requirement that the image
does not hold fails it until it is carried.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

# The device image's packages that dpdm_fast's requirements (and the carried wheels' own) name, as the
# device notes list them (KINDS.md, read on a machine running the image, 2026-11-17; Python 3.12).
DEVICE_IMAGE = frozenset({
    "torch", "triton", "numpy", "scipy", "ninja", "pillow", "tqdm", "matplotlib", "pyyaml", "opt-einsum",
    "packaging", "typing-extensions", "pytest", "pytest-benchmark", "hypothesis",
})
# What travels as wheels, at the versions this project's tests run with (pip resolves them here).
CARRIED = {"opacus": "1.6.0", "omegaconf": "2.4.0", "kornia": "0.9.0", "kornia-rs": "0.2.0"}
# The device's interpreter: the wheels must be built for it (kornia-rs is compiled).
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Modules the prepared run cannot do without (the CLI, configs, the warm-up), and those whose absence
# only drops a column (Opacus: the grid's reference engine and the equivalence tests against it).
NEEDED_MODULES = ("torch", "numpy", "scipy", "omegaconf", "kornia", "kornia_rs", "PIL", "tqdm", "matplotlib", "pytest")
OPTIONAL_MODULES = ("opacus", "triton")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` this interpreter cannot find (found, not imported: cheap)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def download_wheels(dest: Path, python_version: str = DEVICE_PYTHON) -> list[Path]:
    """Download ``CARRIED``'s wheels for the device's Python and platform into ``dest`` (no dependencies:
    each one's own requirements are in the image or in ``CARRIED``, which the tests check). They replace
    what ``dest`` held only once all are here (one version of each: two stop the device's install)."""
    fresh = dest.with_name(dest.name + ".partial")
    shutil.rmtree(fresh, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", str(fresh)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [f"{name}=={version}" for name, version in CARRIED.items()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(fresh, ignore_errors=True)
        raise SystemExit(f"pip could not download the wheels to carry (is PyPI reachable?):\n{done.stderr[-2000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    fresh.rename(dest)
    return sorted(dest.glob("*.whl"))


def exclude_from_git(repo: Path, *patterns: str) -> None:
    """Keep the carried folders out of commits (they travel through the device tool's ``carry``)."""
    path = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()    # (a worktree's .git is a file)
    exclude = repo / path
    exclude.parent.mkdir(parents=True, exist_ok=True)
    present = exclude.read_text().splitlines() if exclude.exists() else []
    with exclude.open("a") as f:
        for pattern in patterns:
            if pattern not in present:
                f.write(pattern + "\n")


def copy_mnist(source: Path, repo: Path) -> Path:
    """Copy the MNIST files into ``repo/shared/data/mnist``, where ``gpu_check.sh`` looks first, writable
    (the shared copy is read-only: a later run must be able to replace it)."""
    dest = repo / "shared" / "data" / "mnist"
    if not (source / "mnist").is_dir():
        raise SystemExit(f"no MNIST under {source} (--shared: the folder holding data/mnist)")
    if dest.exists() and dest.resolve() == (source / "mnist").resolve():
        return dest                      # already there (shared/ is the source itself)
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source / "mnist", dest, copy_function=shutil.copyfile)
    for path in (dest, *dest.rglob("*")):
        path.chmod(path.stat().st_mode | 0o200)
    return dest


def _size_mib(paths) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=None,
                        help="the folder holding data/mnist (default: ../shared beside this checkout)")
    parser.add_argument("--python-version", default=DEVICE_PYTHON,
                        help=f"the wheels' Python (default {DEVICE_PYTHON}, the device's; another only to rehearse "
                             "the run on a bare interpreter here)")
    parser.add_argument("--check", action="store_true",
                        help="on the device: exit 3 naming the needed modules this interpreter lacks")
    args = parser.parse_args(argv)
    if args.check:
        needed, optional = missing_modules(NEEDED_MODULES), missing_modules(OPTIONAL_MODULES)
        if optional:
            print("missing (their parts are left out):", ", ".join(optional))
        if needed:
            print("missing, needed by the prepared run:", ", ".join(needed),
                  "-- run `python bench/gpu_carry.py` in the checkout and carry .whl (see its docstring)")
            return 3
        return 0
    repo = Path(__file__).resolve().parents[1]
    exclude_from_git(repo, "/.whl/", "/shared/")
    wheels = download_wheels(repo / ".whl", args.python_version)
    data = copy_mnist((args.shared or repo.parent / "shared") / "data", repo)
    print(f"{len(wheels)} wheels in .whl ({_size_mib(wheels):.1f} MiB):", ", ".join(w.name for w in wheels))
    print(f"MNIST in {data.relative_to(repo)} ({_size_mib(data.rglob('*')):.1f} MiB); both git-excluded")
    print('then: run(command="bash bench/gpu_check.sh /tmp/gpu --bundle $OUT/gpu_check.tgz", carry=[".whl", "shared"], timeout_s=570)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
