"""Compile the CUDA kernels (``*.cu``) for any architecture, sm_70 included, without nvcc.

CUDA 13's nvcc cannot target sm_70 (V100) any more. CUDA 12's compiler can, and its pieces come as
wheels: NVRTC (``nvidia-cuda-nvrtc-cu12``) compiles the device code to PTX for ``compute_XX`` with the
runtime's and CCCL's headers (``nvidia-cuda-runtime-cu12``, ``nvidia-cuda-cccl-cu12``), and ptxas 12.9
(``nvidia-cuda-nvcc-cu12``, which has ptxas and NVVM but no nvcc driver) assembles the PTX into a cubin
for ``sm_XX``. The host launchers in the ``.cu`` files are hidden from NVRTC (``__CUDACC_RTC__``); every
``__global__`` kernel and every template instance a launcher uses is compiled.

Usage: python -m dpdm_fast.csrc.nvrtc_build [--arch 70,75,80,90] [--out DIR]   (no GPU needed)
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
KERNEL_SOURCES = sorted(SOURCE_DIR.glob("*.cu"))
WHEELS = "pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 nvidia-cuda-nvcc-cu12"


class ToolchainMissing(RuntimeError):
    """The CUDA 12 wheels this route needs are not installed."""


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(f"nvidia.{name}")
    return None if spec is None or not spec.submodule_search_locations else Path(list(spec.submodule_search_locations)[0])


def toolchain() -> dict:
    """Paths of libnvrtc, ptxas and the header folders, or ToolchainMissing saying what to install."""
    dirs = {name: _package_dir(name) for name in ("cuda_nvrtc", "cuda_runtime", "cuda_cccl", "cuda_nvcc")}
    missing = [name for name, d in dirs.items() if d is None]
    if missing:
        raise ToolchainMissing(f"missing {', '.join('nvidia-' + m.replace('_', '-') + '-cu12' for m in missing)}: "
                               f"{WHEELS}")
    libs = sorted((dirs["cuda_nvrtc"] / "lib").glob("libnvrtc.so.*"))
    ptxas = dirs["cuda_nvcc"] / "bin" / "ptxas"
    if not libs or not ptxas.exists():
        raise ToolchainMissing(f"libnvrtc or ptxas not found in the installed wheels: {WHEELS}")
    return {"nvrtc": libs[0], "ptxas": ptxas,
            "include": [dirs["cuda_runtime"] / "include", dirs["cuda_cccl"] / "include", dirs["cuda_nvrtc"] / "include"]}


def _nvrtc(path: Path):
    lib = ctypes.CDLL(str(path))
    for name in ("nvrtcCreateProgram", "nvrtcCompileProgram", "nvrtcGetProgramLogSize", "nvrtcGetProgramLog",
                 "nvrtcGetPTXSize", "nvrtcGetPTX", "nvrtcDestroyProgram", "nvrtcVersion"):
        getattr(lib, name).restype = ctypes.c_int
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def nvrtc_version(tools: dict | None = None) -> str:
    lib = _nvrtc((tools or toolchain())["nvrtc"])
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def compile_ptx(source: Path, arch: int, tools: dict | None = None) -> str:
    """The PTX of ``source``'s device code for compute_``arch`` (RuntimeError with NVRTC's log on failure)."""
    tools = tools or toolchain()
    lib = _nvrtc(tools["nvrtc"])
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or (_ for _ in ()).throw(  # noqa: E731
        RuntimeError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}"))
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture=compute_{arch}", "-std=c++17", "-default-device", f"-I{SOURCE_DIR}",
                   *(f"-I{d}" for d in tools["include"])]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise RuntimeError(f"NVRTC could not compile {source.name} for compute_{arch}:\n{log.value.decode()}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def assemble(ptx: str, arch: int, out: Path, tools: dict | None = None) -> Path:
    """ptxas: the PTX into a cubin for sm_``arch`` at ``out`` (RuntimeError with ptxas's message on failure)."""
    tools = tools or toolchain()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(tools["ptxas"]), f"-arch=sm_{arch}", "-O3", str(src), "-o", str(out)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas could not assemble for sm_{arch}:\n{done.stderr}")
    return out


def kernel_entries(ptx: str) -> list[str]:
    """The (mangled) names of the kernels the PTX defines."""
    return re.findall(r"\.entry\s+([\w$]+)", ptx)


def build_all(archs: list[int], out_dir: Path) -> list[dict]:
    """Every .cu file for every arch: PTX, cubin, the kernels in it; one row per (file, arch)."""
    tools = toolchain()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in KERNEL_SOURCES:
        for arch in archs:
            ptx = compile_ptx(source, arch, tools)
            cubin = assemble(ptx, arch, out_dir / f"{source.stem}.sm_{arch}.cubin", tools)
            rows.append({"file": source.name, "arch": arch, "kernels": kernel_entries(ptx),
                         "cubin_bytes": cubin.stat().st_size})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="70,75,80,90", help="comma-separated SM versions")
    parser.add_argument("--out", default=None, help="folder for the cubins (default: a temporary one)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    try:
        tools = toolchain()
    except ToolchainMissing as e:
        print(f"nvrtc_build: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = build_all(archs, Path(args.out or tmp))
    print(f"NVRTC {nvrtc_version(tools)}, {tools['ptxas']}")
    for r in rows:
        print(f"{r['file']:24s} sm_{r['arch']}  {r['cubin_bytes']:7d} bytes  {len(r['kernels'])} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
