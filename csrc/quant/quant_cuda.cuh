// Fine-grained FP8 quantization: CUDA launchers (same contract as quant.h).
// Written with the build; correctness and speed on a GPU are verified by the
// FP8 GEMM kernel issue before jaxinfra's impl="auto" selects them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant/quant.h"

namespace jaxinfra {
namespace quant {

// x [rows, k] -> q [rows, k], scales [rows, ceil(k / block)], on `stream`.
cudaError_t quantize_per_token_cuda(const void* x, InputType type, int64_t rows, int64_t k,
                                    int64_t block, bool ue8m0, uint8_t* q, float* scales,
                                    cudaStream_t stream);

// w [batch, n, k] -> q [batch, n, k], scales [batch, ceil(n/block_n), ceil(k/block_k)].
cudaError_t quantize_per_block_cuda(const void* w, InputType type, int64_t batch, int64_t n,
                                    int64_t k, int64_t block_n, int64_t block_k, bool ue8m0,
                                    uint8_t* q, float* scales, cudaStream_t stream);

}  // namespace quant
}  // namespace jaxinfra
