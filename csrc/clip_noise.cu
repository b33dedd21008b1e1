// The clip / sum / noise pass over the flat per-example buffer: the twin of kernels/clip_noise.py.
// One block per tile of one parameter's columns; every thread owns COLS columns and reads the tile's
// B rows once. Noise: Philox4x32-10 (Salmon et al., SC'11), counter = (coordinate, draw, 0, 0),
// key = the 64-bit seed, then Box-Muller in fp64: a pure function of (seed, coordinate), like the Triton pass
// (the two generators' streams differ; each is reproducible on its own).
#include "dpdm_kernels.h"

namespace dpdm {
namespace {

constexpr int THREADS = 256, COLS = 4, TILE = THREADS * COLS;

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = __umulhi(M0, ctr.x), lo0 = M0 * ctr.x;
    const uint32_t hi1 = __umulhi(M1, ctr.z), lo1 = M1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += W0;
    key.y += W1;
  }
  return ctr;
}

// N(0, 1) from three uint32: Box-Muller in fp64, the radius from a 53-bit uniform in (0, 1) (a draw can
// reach sqrt(2 * 54 * ln 2) = 8.65; fp32 uniforms would stop near 5.7, and bounded noise costs delta).
__device__ __forceinline__ float normal_from_bits(uint32_t a, uint32_t b, uint32_t c) {
  const double u1 = (double(a >> 5) * 67108864.0 + double(b >> 6) + 0.5) * (1.0 / 9007199254740992.0);
  const double u2 = (double(c) + 0.5) * (1.0 / 4294967296.0);
  return float(sqrt(-2.0 * log(u1)) * cospi(2.0 * u2));
}

__device__ __forceinline__ float standard_normal(uint64_t seed, uint32_t index, uint32_t draw) {
  const uint4 r = philox4x32_10(make_uint4(index, draw, 0u, 0u), make_uint2(uint32_t(seed), uint32_t(seed >> 32)));
  return normal_from_bits(r.x, r.y, r.z);
}

__global__ void __launch_bounds__(THREADS)
clip_reduce_kernel(const float* __restrict__ buffer, const float* __restrict__ norms, const int32_t* __restrict__ written,
                   const int64_t* __restrict__ tiles, const float* total, float* out, int64_t B,  // total may be out
                   float max_norm, float scale, float std, float divisor, uint64_t seed, int draws, int final_pass) {
  __shared__ float factors[THREADS];
  const int64_t* t = tiles + 4 * int64_t(blockIdx.x);
  const int64_t offset = t[0], numel = t[1], start = t[2];
  const int64_t rows = written[t[3]] ? B : 0;
  const float* base = buffer + offset * B;
  float acc[COLS] = {};
  for (int64_t b0 = 0; b0 < rows; b0 += THREADS) {  // the clip factors of THREADS examples at a time
    const int64_t b = b0 + threadIdx.x;
    factors[threadIdx.x] = b < rows ? fminf(max_norm / (norms[b] + 1e-6f), 1.0f) * scale : 0.f;
    __syncthreads();
    const int64_t n = rows - b0 < THREADS ? rows - b0 : THREADS;
    for (int64_t i = 0; i < n; ++i) {
      const float f = factors[i];
      const float* row = base + (b0 + i) * numel;
#pragma unroll
      for (int j = 0; j < COLS; ++j) {
        const int64_t col = start + threadIdx.x + j * THREADS;  // coalesced: neighbouring threads, neighbouring columns
        if (col < numel && col < start + TILE) acc[j] = fmaf(f, row[col], acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    const int64_t col = start + threadIdx.x + j * THREADS;
    if (col >= numel || col >= start + TILE) continue;
    const int64_t flat = offset + col;
    float v = total[flat] + acc[j];
    if (final_pass) {
      if (draws > 0 && std != 0.f) {
        float z = standard_normal(seed, uint32_t(flat), 0u);
        if (draws == 4)
          z = (z + standard_normal(seed, uint32_t(flat), 1u) + standard_normal(seed, uint32_t(flat), 2u) +
               standard_normal(seed, uint32_t(flat), 3u)) * 0.5f;
        v += std * z;
      }
      v /= divisor;
    }
    out[flat] = v;
  }
}

}  // namespace

#ifndef __CUDACC_RTC__
cudaError_t clip_reduce(const float* buffer, const float* norms, const int32_t* written, const int64_t* tiles,
                        int64_t n_tiles, const float* total, float* out, int64_t B, int64_t P, float max_norm,
                        float scale, float std, float divisor, uint64_t seed, int draws, int final_pass,
                        cudaStream_t stream) {
  (void)P;
  if (n_tiles == 0) return cudaSuccess;
  if (draws != 1 && draws != 4) return cudaErrorInvalidValue;
  clip_reduce_kernel<<<unsigned(n_tiles), THREADS, 0, stream>>>(buffer, norms, written, tiles, total, out, B, max_norm,
                                                                scale, std, divisor, seed, draws, final_pass);
  return cudaGetLastError();
}

int clip_reduce_tile() { return TILE; }
#endif  // __CUDACC_RTC__

}  // namespace dpdm
