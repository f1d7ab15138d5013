// CUDA kernels for fine-grained FP8 quantization. The per-element arithmetic
// is common/fp8_e4m3.h, shared with the CPU reference loops, so results match
// them bit for bit; only the traversal differs.
//
//   quantize_per_token: one warp per (row, group); lanes stride the group so
//     loads coalesce; a shuffle reduction gives the group's amax.
//   quantize_per_block: one 256-thread CTA per (batch, row block, column
//     block) tile; warp shuffles plus shared memory give the tile's amax.
#include "quant/quant_cuda.cuh"

#include "common/fp8_e4m3.h"

namespace jaxinfra {
namespace quant {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerCta = 256;
constexpr int kWarpsPerCta = kThreadsPerCta / kWarpSize;
constexpr int64_t kMaxGridX = 0x7fffffff;

template <InputType kType>
__device__ __forceinline__ float load(const void* data, int64_t i) {
  if constexpr (kType == InputType::kFloat32) {
    return static_cast<const float*>(data)[i];
  } else if constexpr (kType == InputType::kBFloat16) {
    return fp8::bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
  } else if constexpr (kType == InputType::kFloat16) {
    return fp8::f16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
  } else {
    return static_cast<float>(static_cast<const double*>(data)[i]);
  }
}

__device__ __forceinline__ float warp_amax(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fp8::nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <InputType kType>
__global__ void __launch_bounds__(kThreadsPerCta)
    quantize_per_token_kernel(const void* x, int64_t num_groups_total, int64_t groups, int64_t k,
                              int64_t block, bool ue8m0, uint8_t* q, float* scales) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (group >= num_groups_total) return;  // the whole warp leaves together
  const int64_t row = group / groups;
  const int64_t col_begin = (group % groups) * block;
  const int64_t length = min(block, k - col_begin);
  const int64_t base = row * k + col_begin;

  float amax = 0.0f;
  for (int64_t i = lane; i < length; i += kWarpSize) {
    amax = fp8::nan_max(amax, fp8::abs_f32(load<kType>(x, base + i)));
  }
  const float scale = fp8::scale_from_amax(warp_amax(amax), ue8m0);
  const float inv_scale = fp8::inverse_scale(scale);
  if (lane == 0) scales[group] = scale;
  for (int64_t i = lane; i < length; i += kWarpSize) {
    q[base + i] = fp8::quantize_value(load<kType>(x, base + i), inv_scale);
  }
}

template <InputType kType>
__global__ void __launch_bounds__(kThreadsPerCta)
    quantize_per_block_kernel(const void* w, int64_t n, int64_t k, int64_t block_n,
                              int64_t block_k, int64_t row_blocks, int64_t col_blocks,
                              bool ue8m0, uint8_t* q, float* scales) {
  __shared__ float warp_partial[kWarpsPerCta];
  const int64_t tile = blockIdx.x;
  const int64_t col_block = tile % col_blocks;
  const int64_t row_block = (tile / col_blocks) % row_blocks;
  const int64_t batch = tile / (col_blocks * row_blocks);
  const int64_t row_begin = row_block * block_n;
  const int64_t col_begin = col_block * block_k;
  const int64_t tile_rows = min(block_n, n - row_begin);
  const int64_t tile_cols = min(block_k, k - col_begin);
  const int64_t tile_size = tile_rows * tile_cols;
  const int64_t origin = (batch * n + row_begin) * k + col_begin;

  float amax = 0.0f;
  for (int64_t e = threadIdx.x; e < tile_size; e += kThreadsPerCta) {
    const int64_t i = origin + (e / tile_cols) * k + e % tile_cols;
    amax = fp8::nan_max(amax, fp8::abs_f32(load<kType>(w, i)));
  }
  amax = warp_amax(amax);
  if (threadIdx.x % kWarpSize == 0) warp_partial[threadIdx.x / kWarpSize] = amax;
  __syncthreads();
  amax = warp_partial[0];
  for (int i = 1; i < kWarpsPerCta; ++i) amax = fp8::nan_max(amax, warp_partial[i]);
  const float scale = fp8::scale_from_amax(amax, ue8m0);
  const float inv_scale = fp8::inverse_scale(scale);
  if (threadIdx.x == 0) scales[tile] = scale;
  for (int64_t e = threadIdx.x; e < tile_size; e += kThreadsPerCta) {
    const int64_t i = origin + (e / tile_cols) * k + e % tile_cols;
    q[i] = fp8::quantize_value(load<kType>(w, i), inv_scale);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <template <InputType> class Launch, typename... Args>
cudaError_t dispatch_input_type(InputType type, Args... args) {
  switch (type) {
    case InputType::kFloat32:
      return Launch<InputType::kFloat32>::run(args...);
    case InputType::kBFloat16:
      return Launch<InputType::kBFloat16>::run(args...);
    case InputType::kFloat16:
      return Launch<InputType::kFloat16>::run(args...);
    case InputType::kFloat64:
      return Launch<InputType::kFloat64>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <InputType kType>
struct LaunchPerToken {
  static cudaError_t run(const void* x, int64_t rows, int64_t k, int64_t block, bool ue8m0,
                         uint8_t* q, float* scales, cudaStream_t stream) {
    const int64_t groups = ceil_div(k, block);
    const int64_t total = rows * groups;
    if (total == 0) return cudaSuccess;
    const int64_t ctas = ceil_div(total, kWarpsPerCta);
    if (ctas > kMaxGridX) return cudaErrorInvalidConfiguration;
    quantize_per_token_kernel<kType><<<static_cast<unsigned>(ctas), kThreadsPerCta, 0, stream>>>(
        x, total, groups, k, block, ue8m0, q, scales);
    return cudaGetLastError();
  }
};

template <InputType kType>
struct LaunchPerBlock {
  static cudaError_t run(const void* w, int64_t batch, int64_t n, int64_t k, int64_t block_n,
                         int64_t block_k, bool ue8m0, uint8_t* q, float* scales,
                         cudaStream_t stream) {
    const int64_t row_blocks = ceil_div(n, block_n);
    const int64_t col_blocks = ceil_div(k, block_k);
    const int64_t tiles = batch * row_blocks * col_blocks;
    if (tiles == 0) return cudaSuccess;
    if (tiles > kMaxGridX) return cudaErrorInvalidConfiguration;
    quantize_per_block_kernel<kType><<<static_cast<unsigned>(tiles), kThreadsPerCta, 0, stream>>>(
        w, n, k, block_n, block_k, row_blocks, col_blocks, ue8m0, q, scales);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t quantize_per_token_cuda(const void* x, InputType type, int64_t rows, int64_t k,
                                    int64_t block, bool ue8m0, uint8_t* q, float* scales,
                                    cudaStream_t stream) {
  return dispatch_input_type<LaunchPerToken>(type, x, rows, k, block, ue8m0, q, scales, stream);
}

cudaError_t quantize_per_block_cuda(const void* w, InputType type, int64_t batch, int64_t n,
                                    int64_t k, int64_t block_n, int64_t block_k, bool ue8m0,
                                    uint8_t* q, float* scales, cudaStream_t stream) {
  return dispatch_input_type<LaunchPerBlock>(type, w, batch, n, k, block_n, block_k, ue8m0, q,
                                             scales, stream);
}

}  // namespace quant
}  // namespace jaxinfra
