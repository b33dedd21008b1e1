"""Compile every Triton kernel ahead of time for NVIDIA GPUs, without a GPU.

Triton's interpreter (how the kernels are tested on CPUs) runs the kernels' Python, not their
compilation: a kernel can pass there and still fail to compile for a GPU (an op or dtype the compiler
does not lower, a shape rule the interpreter does not enforce). ``triton.compile`` with an explicit
target runs the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin through Triton's ptxas) on the CPU.
Each kernel is compiled with the argument types and constants its launcher uses (fp32 and bf16
operands, TF32 and IEEE products, every flag).

Usage: TRITON_INTERPRET=0 python -m dpdm_fast.kernels.compile_check [--arch 80,90]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

from ._common import interpreting


def variants():
    """(name, kernel, signature, constexprs) for every compiled form the launchers can request."""
    from . import clip_noise, conv_weight_grad, group_gemm, group_norm_grad, group_sum
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    for dt, prec in itertools.product(("fp32", "bf16"), ("tf32", "ieee")):
        if dt == "bf16" and prec == "tf32":
            continue
        for geometry in ((1, 1, 1, 1, 3, 3), (2, 2, 1, 1, 3, 3), (1, 1, 0, 0, 1, 1)):
            sig = {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "out_ptr": "*fp32", "sq_ptr": "*fp32",
                   **ints("K", "C", "H", "W", "O", "WO", "HWO", "R", "NCOL", "sxn", "sxc", "sxh", "sxw", "sgn",
                          "sgo", "sgh", "sgw")}
            const = dict(zip(("SH", "SW", "PH", "PW", "KH", "KW"), geometry), BM=64, BN=64, BR=32, PRECISION=prec,
                         UPCAST=False)
            yield f"conv_weight_grad {dt} {prec} {geometry}", conv_weight_grad._conv_weight_grad_kernel, sig, const
        sig = {"a_ptr": f"*{dt}", "c_ptr": f"*{dt}", "out_ptr": "*fp32", "sq_ptr": "*fp32",
               **ints("K", "M", "P", "S", "R", "sar", "sam", "sas", "scr", "scp", "scs")}
        yield (f"group_gemm {dt} {prec}", group_gemm._group_gemm_kernel, sig,
               dict(BM=64, BN=64, BR=32, PRECISION=prec, UPCAST=False))
    for dt in ("fp32", "bf16"):
        sig = {"a_ptr": f"*{dt}", "out_ptr": "*fp32", "sq_ptr": "*fp32", **ints("K", "M", "S", "R", "sar", "sam", "sas")}
        yield f"group_sum {dt}", group_sum._group_sum_kernel, sig, dict(BM=32, BR=128)
        for has_w, has_b in ((True, True), (True, False), (False, True)):
            sig = {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": "*fp32",
                   "b_ptr": "*fp32", "sqw_ptr": "*fp32", "sqb_ptr": "*fp32",
                   **ints("K", "C", "S", "G", "CPG", "sxr", "sxc", "sxs", "sgr", "sgc", "sgs")}
            yield (f"group_norm_grad {dt} w={has_w} b={has_b}", group_norm_grad._group_norm_grad_kernel, sig,
                   dict(HAS_W=has_w, HAS_B=has_b, BC=16, BS=128))
    for final, draws, per_layer in ((False, 0, False), (True, 0, False), (True, 1, False), (True, 4, False),
                                    (False, 0, True)):
        sig = {"buf_ptr": "*fp32", "norms_ptr": "*fp32", "written_ptr": "*i32", "tiles_ptr": "*i64",
               "total_ptr": "*fp32", "out_ptr": "*fp32", "bounds_ptr": "*fp32", "B": "i32", "P": "i32",
               "max_norm": "fp32", "scale": "fp32", "std": "fp32", "divisor": "fp32", "seed": "i64"}
        yield (f"clip_reduce final={final} draws={draws} per_layer={per_layer}", clip_noise._clip_reduce_kernel, sig,
               dict(BLOCK=1024, FINAL=final, DRAWS=draws, PER_LAYER=per_layer))


def compile_all(archs: list[int]) -> list[str]:
    """Compile every variant for every arch; returns failure messages (empty when all compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = []
    for name, kernel, sig, const in variants():
        if type(kernel).__name__ == "InterpretedFunction":
            raise RuntimeError("the kernels were imported with TRITON_INTERPRET=1: run with TRITON_INTERPRET=0")
        full = {**sig, **{k: "constexpr" for k in const}}
        for arch in archs:
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=const),
                                          target=GPUTarget("cuda", arch, 32))
                if not compiled.asm.get("cubin"):
                    failures.append(f"{name} sm_{arch}: no cubin")
            except Exception as e:  # report every kernel, not just the first failure
                failures.append(f"{name} sm_{arch}: {type(e).__name__}: {str(e)[:400]}")
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    args = ap.parse_args()
    if interpreting():
        raise SystemExit("set TRITON_INTERPRET=0: the interpreter does not compile")
    t0 = time.perf_counter()
    archs = [int(a) for a in args.arch.split(",")]
    failures = compile_all(archs)
    n = sum(1 for _ in variants()) * len(archs)
    for f in failures:
        print("FAILED", f)
    print(f"{n - len(failures)}/{n} kernel variants compiled to cubin for sm_{'/sm_'.join(map(str, archs))} "
          f"in {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
