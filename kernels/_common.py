"""What every kernel launcher shares: interpreter detection, dtypes, matmul precision, block sizes."""
from __future__ import annotations

import os

import torch
import triton

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_inputs(dtype: torch.dtype) -> bool:
    """Whether a kernel converts its half-precision operands to fp32 before ``tl.dot``.

    Triton's interpreter multiplies bf16 tiles wrongly (it reads their bits as another type), so
    there the operands are converted first. That changes nothing numerically: the product of two
    bf16 (or fp16) numbers is exact in fp32, and the accumulation is fp32 either way.
    """
    return dtype != torch.float32 and interpreting()


def dot_precision(allow_tf32: bool) -> str:
    """``tl.dot``'s precision for fp32 operands: TF32 exactly where torch itself would use it."""
    return "tf32" if allow_tf32 and not interpreting() else "ieee"


def check_inputs(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.dtype not in FLOAT_INPUTS:
            raise TypeError(f"kernel inputs must be fp32, bf16 or fp16, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"kernel inputs on different devices: {t.device} and {device}")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels on {device.type} tensors run only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing dpdm_fast, or move the model to a GPU")


def check_output(out: torch.Tensor, shape: tuple, name: str = "out") -> None:
    if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {tuple(shape)}, got "
                         f"{out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})")


def block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two tile edge for a dimension of size n (``tl.dot`` needs at least 16).

    In the interpreter, tiles up to 8x larger: each program and loop iteration costs Python time
    there, while numpy handles big tiles at once (the results do not depend on the tiling beyond
    the order of fp32 additions)."""
    hi = hi * 8 if interpreting() else hi
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))
