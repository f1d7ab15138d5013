// Fine-grained FP8 quantization: reference CPU loops.
//
// Contract (shared with jaxinfra/quant.py and quant_cuda.cuh): every value is
// first converted to float32; a group's scale is max(amax, 1e-4) * f32(1/448),
// optionally rounded up to a power of two (ue8m0); each element becomes
// e4m3fn(round_to_e4m3(x / scale)). Groups at the end of a row or column may
// be partial. Arrays are dense and row-major; fp8 values are raw e4m3fn bytes.
#pragma once

#include <cstdint>

namespace jaxinfra {
namespace quant {

enum class InputType { kFloat32, kBFloat16, kFloat16, kFloat64 };

// x [rows, k] -> q [rows, k], scales [rows, ceil(k / block)] (1 x block groups).
void quantize_per_token_cpu(const void* x, InputType type, int64_t rows, int64_t k,
                            int64_t block, bool ue8m0, uint8_t* q, float* scales);

// w [batch, n, k] -> q [batch, n, k],
// scales [batch, ceil(n / block_n), ceil(k / block_k)] (block_n x block_k tiles).
void quantize_per_block_cpu(const void* w, InputType type, int64_t batch, int64_t n,
                            int64_t k, int64_t block_n, int64_t block_k, bool ue8m0,
                            uint8_t* q, float* scales);

}  // namespace quant
}  // namespace jaxinfra
