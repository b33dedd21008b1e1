"""CUDA C++ kernels of dpdm_fast (installed as ``dpdm_fast.csrc``), built on first use.

The kernels are plain CUDA C++ (``*.cu``: raw pointers, sizes, a stream; no torch headers); the torch
binding is ``binding.cpp``. ``load()`` compiles both with ninja through ``torch.utils.cpp_extension``
for the GPU at hand (``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPU's architecture). That needs
a CUDA build of torch, a GPU, ``nvcc`` and ninja; each missing piece is an error saying which.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
KERNEL_SOURCES = sorted(SOURCE_DIR.glob("*.cu"))
_EXTENSION = None


def unavailable_reason() -> str | None:
    """Why the CUDA extension cannot be built here, or None when it can."""
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=str(Path(cpp_extension.CUDA_HOME) / "bin")) is None:
        return "no CUDA toolkit (nvcc) found: install one matching torch.version.cuda or set CUDA_HOME"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "ninja is not installed: pip install ninja"
    nvcc = shutil.which("nvcc", path=str(Path(cpp_extension.CUDA_HOME) / "bin"))
    return arch_reason(torch.cuda.get_device_capability(), nvcc_release(nvcc))


def nvcc_release(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc --version``'s release, or None if it cannot be read."""
    import re
    import subprocess
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return (int(found[1]), int(found[2])) if found else None


def arch_reason(capability: tuple[int, int], release: tuple[int, int] | None) -> str | None:
    """Why nvcc ``release`` cannot build for a GPU of ``capability``, or None: CUDA 13 dropped sm_70 (V100)."""
    if release is not None and release[0] >= 13 and capability < (7, 5):
        return (f"nvcc {release[0]}.{release[1]} cannot target sm_{capability[0]}{capability[1]} (CUDA 13 dropped "
                "sm_70): point CUDA_HOME at a CUDA 12 toolkit with a CUDA 12 build of torch, or use "
                "backend='triton' (its kernels compile for sm_70); `python -m dpdm_fast.csrc.nvrtc_build --arch 70` "
                "checks these kernels for sm_70 with CUDA 12's NVRTC and ptxas")
    return None


def load(verbose: bool = False):
    """The compiled extension module (built once per machine into torch's extension cache)."""
    global _EXTENSION
    if _EXTENSION is None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the CUDA kernels cannot be built: {reason}")
        from torch.utils import cpp_extension
        _EXTENSION = cpp_extension.load(
            name="dpdm_fast_cuda", sources=[str(SOURCE_DIR / "binding.cpp"), *map(str, KERNEL_SOURCES)],
            extra_include_paths=[str(SOURCE_DIR)], extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17"], verbose=verbose)
    return _EXTENSION
