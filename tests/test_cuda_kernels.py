"""The CUDA C++ kernels (csrc/): every .cu file compiles with nvcc for sm_75 and sm_90 (on any machine
with nvcc, GPU or not) and, through NVRTC 12 and ptxas 12.9 from the CUDA 12 wheels (the dev extras), for
sm_70 (V100, which CUDA 13's nvcc cannot target), sm_75, sm_80 and sm_90; the torch binding passes a compiler's syntax check, and, where a CUDA build of
torch and a GPU exist, the built extension matches the torch backend."""
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import ROOT

CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h), where nvcc's toolkit is."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  NVCC and str(Path(NVCC).resolve().parent.parent)]
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_kernel_compiles_with_nvcc_for_sm75_sm80_and_sm90(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-Werror", "all-warnings", "-gencode", "arch=compute_75,code=sm_75",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", str(CSRC / source),
           "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


EXPECTED_KERNELS = {"clip_noise.cu": 1, "conv_weight_grad.cu": 3}   # conv: its fp32, bf16 and fp16 instances


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CUDA 12 wheels are Linux-only")
@pytest.mark.parametrize("arch", [70, 75, 80, 90])
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_kernel_compiles_through_nvrtc_for_every_arch(source, arch, tmp_path):
    import struct

    from dpdm_fast.csrc import nvrtc_build
    ptx = nvrtc_build.compile_ptx(CSRC / source, arch)      # ToolchainMissing: pip install -e ".[dev]"
    assert f".target sm_{arch}" in ptx
    assert len(nvrtc_build.kernel_entries(ptx)) == EXPECTED_KERNELS[source]
    cubin = nvrtc_build.assemble(ptx, arch, tmp_path / "k.cubin").read_bytes()
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<I", cubin, 0x30)[0] & 0xFF == arch   # e_flags: the SM


def test_a_v100_with_cuda_13_nvcc_gets_a_reason_not_a_broken_build():
    from dpdm_fast import csrc
    assert "sm_70" in csrc.arch_reason((7, 0), (13, 0)) and "CUDA 12" in csrc.arch_reason((7, 0), (13, 0))
    assert csrc.arch_reason((7, 0), (12, 9)) is None and csrc.arch_reason((7, 5), (13, 0)) is None
    assert csrc.arch_reason((9, 0), None) is None


@pytest.mark.skipif(cuda_include() is None or shutil.which("g++") is None,
                    reason="needs the CUDA toolkit's headers and g++")
def test_torch_binding_passes_a_syntax_check(tmp_path):
    """The CPU torch wheel lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h); with an
    empty stand-in for it, g++ checks the binding against torch's real CUDA stream/guard declarations."""
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-I{tmp_path}", *[f"-I{p}" for p in include_paths()],
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include()}", f"-I{CSRC}",
           "-DTORCH_EXTENSION_NAME=dpdm_fast_cuda", str(CSRC / "binding.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _extension_or_skip():
    from dpdm_fast import csrc
    reason = csrc.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA extension not buildable here: {reason}")
    return csrc.load()


def test_load_explains_why_it_cannot_build():
    from dpdm_fast import csrc
    reason = csrc.unavailable_reason()
    if reason is None:
        pytest.skip("the extension can be built here")
    with pytest.raises(RuntimeError, match="cannot be built: " + reason.split(" (")[0][:30]):
        csrc.load()


@pytest.mark.parametrize("B,K,C,O,H,k,s,p,dtype", [(2, 3, 5, 7, 9, 3, 1, 1, torch.float32),
                                                   (1, 1, 4, 4, 1, 1, 1, 0, torch.float32),
                                                   (3, 2, 70, 65, 8, 3, 2, 1, torch.float32),
                                                   (2, 4, 32, 64, 7, 3, 1, 1, torch.bfloat16)])
def test_cuda_conv_weight_grad_matches_the_reference(B, K, C, O, H, k, s, p, dtype):
    ext = _extension_or_skip()
    from dpdm_fast.kernels.conv_weight_grad import reference_conv2d_weight_grad
    x = torch.randn(B * K, C, H, H, device="cuda").to(dtype)
    Ho = (H + 2 * p - k) // s + 1
    g = torch.randn(B * K, O, Ho, Ho, device="cuda").to(dtype)
    out = torch.empty(B, O, C, k, k, device="cuda")
    sq = torch.zeros(B, device="cuda")
    ext.conv2d_weight_grad(x, g, K, [O, C, k, k], [s, s], [p, p], out, sq)
    torch.backends.cudnn.allow_tf32 = False
    want = reference_conv2d_weight_grad(x, g, K, (O, C, k, k), (s, s), (p, p))
    assert ((out - want).abs().max() / want.abs().max()).item() < 1e-4
    assert ((sq - want.flatten(1).pow(2).sum(1)).abs().max() / sq.max()).item() < 1e-4


def test_cuda_clip_reduce_and_noise():
    ext = _extension_or_skip()
    from dpdm_fast.kernels.clip_noise import reference_clip_reduce, tile_table
    numels, B = [5, 1030, 7, 2100], 3
    P = sum(numels)
    buf = torch.randn(B * P, device="cuda")
    written = torch.tensor([1, 1, 0, 1], dtype=torch.int32, device="cuda")
    norms = torch.rand(B, device="cuda") * 3
    total = torch.randn(P, device="cuda")
    tiles = tile_table(numels, "cuda", ext.clip_reduce_tile())
    out = torch.empty(P, device="cuda")
    ext.clip_reduce(buf, norms, written, tiles, total, out, 1.0, 0.5, 0.0, 1.0, 0, 1, False)
    want = reference_clip_reduce(buf, numels, written, norms, 1.0, 0.5, total)
    assert ((out - want).abs().max() / want.abs().max()).item() < 1e-5
    n = 1 << 20
    zeros = torch.zeros(n, device="cuda")
    noise = torch.empty(n, device="cuda")
    none = torch.zeros(1, dtype=torch.int32, device="cuda")
    for draws in (1, 4):
        ext.clip_reduce(zeros, torch.zeros(1, device="cuda"), none, tile_table([n], "cuda", ext.clip_reduce_tile()),
                        zeros, noise, 1.0, 1.0, 2.0, 4.0, 99, draws, True)
        assert abs(noise.mean().item()) < 5 * 0.5 / math.sqrt(n) and abs(noise.std().item() / 0.5 - 1) < 0.01


def test_cuda_backend_engine_matches_torch():
    _extension_or_skip()
    from dpdm_fast.engine import DPOptimizer, PrivateModule
    grads = {}
    for backend in ("torch", "cuda"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                            nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 16, 1)).cuda()
        pm = PrivateModule(net, noise_multiplicity=4, max_grad_norm=0.1, backend=backend)
        opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), pm.collector, noise_multiplier=0.0,
                          expected_batch_size=8)
        torch.manual_seed(1)
        pm(torch.randn(32, 3, 32, 32, device="cuda")).pow(2).mean().backward()
        opt.step()
        grads[backend] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert ((grads["cuda"] - grads["torch"]).abs().max() / grads["torch"].abs().max()).item() < 1e-4
