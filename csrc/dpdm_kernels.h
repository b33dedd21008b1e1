// dpdm_fast CUDA kernels: plain CUDA C++ (raw pointers, sizes, a stream; no torch headers), so that
// every .cu file compiles with nvcc alone (CI checks sm_75 and sm_90) and the torch binding
// (binding.cpp) stays apart. Each kernel is the twin of a Triton kernel in kernels/.
#pragma once

#ifdef __CUDACC_RTC__
// NVRTC (csrc/nvrtc_build.py: sm_70 and any other arch without nvcc) sees the device code only.
#include <cuda/std/cstdint>
using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
#else
#include <cstdint>
#include <cuda_runtime.h>
#endif

namespace dpdm {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct Strides4 {
  int64_t n, c, h, w;
};

#ifndef __CUDACC_RTC__
// Per-group Conv2d weight gradient (groups=1, dilation=1) as an implicit GEMM over the K*Ho*Wo output
// positions of each group: out[b] (O x C*KH*KW, fp32, contiguous) and sqnorm[b] += ||out[b]||^2.
cudaError_t conv2d_weight_grad(const void* x, Strides4 xs, const void* g, Strides4 gs, DType dtype, float* out,
                               float* sqnorm, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, int64_t O,
                               int64_t HO, int64_t WO, int KH, int KW, int SH, int SW, int PH, int PW,
                               cudaStream_t stream);

// The clip / sum / noise pass over the flat per-example buffer (see kernels/clip_noise.py):
// tiles (n_tiles x 4 int64: parameter offset, numel, first column, parameter index) cover the P
// columns. final == 0: out = total + sum_b factor_b * block_b; final != 0: out = (that + std * z) / divisor,
// z ~ N(0, 1) from Philox4x32-10 keyed by seed, counter = coordinate (draws = 4: (z1+z2+z3+z4)/2).
cudaError_t clip_reduce(const float* buffer, const float* norms, const int32_t* written, const int64_t* tiles,
                        int64_t n_tiles, const float* total, float* out, int64_t B, int64_t P, float max_norm,
                        float scale, float std, float divisor, uint64_t seed, int draws, int final_pass,
                        cudaStream_t stream);

// Columns per tile that clip_reduce expects in its tile table.
int clip_reduce_tile();
#endif  // __CUDACC_RTC__

}  // namespace dpdm
