// torch binding of the CUDA kernels in this folder (built by dpdm_fast.csrc.load() with a CUDA build of
// torch): checks the tensors, then hands raw pointers, sizes and the current stream to the kernels.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "dpdm_kernels.h"

namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_out(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous fp32 CUDA tensor");
}

dpdm::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return dpdm::DType::F32;
    case torch::kBFloat16: return dpdm::DType::BF16;
    case torch::kFloat16: return dpdm::DType::F16;
    default: TORCH_CHECK(false, "conv2d_weight_grad takes fp32, bf16 or fp16 inputs, got ", t.scalar_type());
  }
}

dpdm::Strides4 strides_of(const torch::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void conv2d_weight_grad(torch::Tensor x, torch::Tensor g, int64_t K, std::vector<int64_t> weight_shape,
                        std::vector<int64_t> stride, std::vector<int64_t> padding, torch::Tensor out,
                        torch::Tensor sqnorm) {
  TORCH_CHECK(x.is_cuda() && g.is_cuda() && x.dim() == 4 && g.dim() == 4, "x and g must be 4-d CUDA tensors");
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), "x and g must have the same dtype");
  TORCH_CHECK(weight_shape.size() == 4 && stride.size() == 2 && padding.size() == 2, "bad conv geometry");
  TORCH_CHECK(K > 0 && x.size(0) % K == 0 && g.size(0) == x.size(0), "rows must be a multiple of K");
  TORCH_CHECK(weight_shape[0] == g.size(1) && weight_shape[1] == x.size(1), "weight shape does not fit x and g");
  const int64_t B = x.size(0) / K;
  check_out(out, "out");
  check_out(sqnorm, "sqnorm");
  TORCH_CHECK(out.numel() == B * weight_shape[0] * weight_shape[1] * weight_shape[2] * weight_shape[3] &&
              sqnorm.numel() == B, "out / sqnorm have the wrong size");
  const c10::cuda::CUDAGuard guard(x.device());
  check(dpdm::conv2d_weight_grad(x.data_ptr(), strides_of(x), g.data_ptr(), strides_of(g), dtype_of(x),
                                 out.data_ptr<float>(), sqnorm.data_ptr<float>(), B, K, x.size(1), x.size(2),
                                 x.size(3), g.size(1), g.size(2), g.size(3), int(weight_shape[2]),
                                 int(weight_shape[3]), int(stride[0]), int(stride[1]), int(padding[0]),
                                 int(padding[1]), c10::cuda::getCurrentCUDAStream()),
        "conv2d_weight_grad");
}

void clip_reduce(torch::Tensor buffer, torch::Tensor norms, torch::Tensor written, torch::Tensor tiles,
                 torch::Tensor total, torch::Tensor out, double max_norm, double scale, double std, double divisor,
                 int64_t seed, int64_t draws, bool final_pass) {
  check_out(buffer, "buffer");
  check_out(norms, "norms");
  check_out(total, "total");
  check_out(out, "out");
  TORCH_CHECK(written.is_cuda() && written.scalar_type() == torch::kInt32, "written must be int32 on the GPU");
  TORCH_CHECK(tiles.is_cuda() && tiles.scalar_type() == torch::kInt64 && tiles.is_contiguous() && tiles.dim() == 2 &&
              tiles.size(1) == 4, "tiles must be a contiguous (n, 4) int64 CUDA tensor");
  TORCH_CHECK(out.numel() == total.numel(), "out and total differ in size");
  const int64_t B = norms.numel(), P = total.numel();
  TORCH_CHECK(buffer.numel() >= B * P, "buffer holds ", buffer.numel(), " values, fewer than ", B, " x ", P);
  TORCH_CHECK(draws == 1 || draws == 4, "draws must be 1 or 4");
  TORCH_CHECK(P < (int64_t(1) << 31) / draws, "too many coordinates for 32-bit Philox counters: ", P);
  TORCH_CHECK(written.is_contiguous() && tiles.numel() > 0, "written must be contiguous and tiles non-empty");
  const c10::cuda::CUDAGuard guard(total.device());
  check(dpdm::clip_reduce(buffer.data_ptr<float>(), norms.data_ptr<float>(), written.data_ptr<int32_t>(),
                          tiles.data_ptr<int64_t>(), tiles.size(0), total.data_ptr<float>(), out.data_ptr<float>(),
                          B, P, float(max_norm), float(scale), float(std), float(divisor),
                          uint64_t(seed), int(draws), final_pass ? 1 : 0, c10::cuda::getCurrentCUDAStream()),
        "clip_reduce");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv2d_weight_grad", &conv2d_weight_grad, "per-group Conv2d weight gradient with squared norms");
  m.def("clip_reduce", &clip_reduce, "clip / sum / noise / scale pass over the per-example buffer");
  m.def("clip_reduce_tile", &dpdm::clip_reduce_tile, "columns per tile of clip_reduce");
}
