// Per-group Conv2d weight gradient, implicit GEMM: the twin of kernels/conv_weight_grad.py.
//
// Block (m tile, n tile, group b) computes out[b][m][n] = sum_r g[b*K+k, m, ho, wo] * x[b*K+k, c, ih, iw]
// over r = (k, ho, wo), with n = (c, kh, kw), ih = ho*SH - PH + kh, iw = wo*SW - PW + kw (zero outside).
// Tiles of both operands are staged in shared memory as fp32; each thread accumulates a 4x4 patch
// of the 64x64 output tile in registers; the epilogue writes the tile and adds its squared norm.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dpdm_kernels.h"

namespace dpdm {
namespace {

constexpr int TM = 64, TN = 64, TR = 16, THREADS = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__global__ void __launch_bounds__(THREADS)
conv_weight_grad_kernel(const T* __restrict__ x, Strides4 xs, const T* __restrict__ g, Strides4 gs,
                        float* __restrict__ out, float* __restrict__ sqnorm, int64_t K, int64_t C, int64_t H,
                        int64_t W, int64_t O, int64_t WO, int64_t HWO, int64_t R, int64_t NCOL, int KH, int KW,
                        int SH, int SW, int PH, int PW) {
  __shared__ float As[TR][TM + 1];  // output gradient tile, transposed: As[r][m]
  __shared__ float Bs[TR][TN + 1];  // patch tile: Bs[r][n]
  __shared__ float partial[THREADS / 32];
  const int64_t m0 = int64_t(blockIdx.x) * TM, n0 = int64_t(blockIdx.y) * TN, b = blockIdx.z;
  const int tid = threadIdx.x, tm = (tid / 16) * 4, tn = (tid % 16) * 4;
  float acc[4][4] = {};
  for (int64_t r0 = 0; r0 < R; r0 += TR) {
    for (int i = tid; i < TR * TM; i += THREADS) {  // As: r fastest, so neighbouring threads read neighbouring wo
      const int rr = i % TR, mm = i / TR;
      const int64_t r = r0 + rr, m = m0 + mm;
      float v = 0.f;
      if (r < R && m < O) {
        const int64_t k = r / HWO, pos = r % HWO, ho = pos / WO, wo = pos % WO;
        v = to_float(g[(b * K + k) * gs.n + m * gs.c + ho * gs.h + wo * gs.w]);
      }
      As[rr][mm] = v;
    }
    for (int i = tid; i < TR * TN; i += THREADS) {
      const int rr = i % TR, nn = i / TR;
      const int64_t r = r0 + rr, n = n0 + nn;
      float v = 0.f;
      if (r < R && n < NCOL) {
        const int64_t k = r / HWO, pos = r % HWO, ho = pos / WO, wo = pos % WO;
        const int64_t c = n / (KH * KW), kh = (n / KW) % KH, kw = n % KW;
        const int64_t ih = ho * SH - PH + kh, iw = wo * SW - PW + kw;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = to_float(x[(b * K + k) * xs.n + c * xs.c + ih * xs.h + iw * xs.w]);
      }
      Bs[rr][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < TR; ++rr) {
      float a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { a[i] = As[rr][tm + i]; c[i] = Bs[rr][tn + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
    }
    __syncthreads();
  }
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tm + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tn + j;
      if (m < O && n < NCOL) {
        out[(b * O + m) * NCOL + n] = acc[i][j];
        sq += acc[i][j] * acc[i][j];
      }
    }
  }
  for (int off = 16; off > 0; off /= 2) sq += __shfl_down_sync(0xffffffffu, sq, off);
  if (tid % 32 == 0) partial[tid / 32] = sq;
  __syncthreads();
  if (tid == 0) {
    float s = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) s += partial[w];
    atomicAdd(sqnorm + b, s);
  }
}

#ifdef __CUDACC_RTC__
// NVRTC compiles no host launcher: instantiate the kernels the launchers below use.
#define DPDM_CONV_KERNEL(T)                                                                                      \
  template __global__ void conv_weight_grad_kernel<T>(const T*, Strides4, const T*, Strides4, float*, float*,   \
                                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,     \
                                                      int64_t, int64_t, int64_t, int, int, int, int, int, int);
DPDM_CONV_KERNEL(float)
DPDM_CONV_KERNEL(__nv_bfloat16)
DPDM_CONV_KERNEL(__half)
#undef DPDM_CONV_KERNEL
#else
template <typename T>
cudaError_t launch(const void* x, Strides4 xs, const void* g, Strides4 gs, float* out, float* sqnorm, int64_t B,
                   int64_t K, int64_t C, int64_t H, int64_t W, int64_t O, int64_t HO, int64_t WO, int KH, int KW,
                   int SH, int SW, int PH, int PW, cudaStream_t stream) {
  const int64_t ncol = C * KH * KW, R = K * HO * WO;
  const dim3 grid(unsigned((O + TM - 1) / TM), unsigned((ncol + TN - 1) / TN), unsigned(B));
  conv_weight_grad_kernel<T><<<grid, THREADS, 0, stream>>>(static_cast<const T*>(x), xs, static_cast<const T*>(g), gs,
                                                           out, sqnorm, K, C, H, W, O, WO, HO * WO, R, ncol, KH, KW,
                                                           SH, SW, PH, PW);
  return cudaGetLastError();
}
#endif  // __CUDACC_RTC__

}  // namespace

#ifndef __CUDACC_RTC__
cudaError_t conv2d_weight_grad(const void* x, Strides4 xs, const void* g, Strides4 gs, DType dtype, float* out,
                               float* sqnorm, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, int64_t O,
                               int64_t HO, int64_t WO, int KH, int KW, int SH, int SW, int PH, int PW,
                               cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F32:
      return launch<float>(x, xs, g, gs, out, sqnorm, B, K, C, H, W, O, HO, WO, KH, KW, SH, SW, PH, PW, stream);
    case DType::BF16:
      return launch<__nv_bfloat16>(x, xs, g, gs, out, sqnorm, B, K, C, H, W, O, HO, WO, KH, KW, SH, SW, PH, PW, stream);
    case DType::F16:
      return launch<__half>(x, xs, g, gs, out, sqnorm, B, K, C, H, W, O, HO, WO, KH, KW, SH, SW, PH, PW, stream);
  }
  return cudaErrorInvalidValue;
}
#endif  // __CUDACC_RTC__

}  // namespace dpdm
