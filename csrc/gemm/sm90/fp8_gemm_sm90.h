// Hopper (sm_90a) FP8 GEMMs with DeepGEMM's fine-grained scaling: the host API
// that ffi/gemm_cuda.cc calls. Same arithmetic and buffer layouts as the CPU
// loops in gemm.h (per-token 1x128 A scales, MN-major; 128x128 B scales).
//
// Status: written and compiled for sm_90a, never run (no GPU was lent);
// docs/gpu-kernels.md lists what a GPU session must verify.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "gemm/gemm.h"

namespace jaxinfra {
namespace gemm {
namespace sm90 {

// How the rows of A map to problems and B matrices.
enum class RowLayout {
  kDense,               // `batch` independent [m, k] x [n, k] problems
  kMasked,              // problem p computes its first masked_rows(masked_m[p], m) rows
  kContiguousIndices,   // per-row group m_indices [batch, m] (-1 / out of range: zero row)
  kContiguousEnds,      // group_ends [batch, groups] (DeepGEMM's psum layout)
  kKGrouped,            // D[g] = C[g] + A[:, seg_g] B[:, seg_g]^T, group_k [groups] (one problem)
};

struct Fp8GemmArgs {
  RowLayout layout = RowLayout::kDense;
  int64_t batch = 1;     // problems (vmap dims; for kMasked also the group dim)
  int64_t m = 0, n = 0, k = 0;
  int64_t groups = 1;    // B matrices per problem (contiguous layouts); K groups (kKGrouped)
  int64_t alignment = 1; // group start alignment (kContiguousEnds)
  const uint8_t* a = nullptr;    // [batch, m, k], k % 16 == 0
  const float* sfa = nullptr;    // [batch, ceil(k/128), align(m, 4)]
  const uint8_t* b = nullptr;    // [batch, groups, n, k]
  const float* sfb = nullptr;    // [batch, groups, ceil(n/128), ceil(k/128)], or with
                                 // b_per_token [batch, ceil(k/128), align(n, 4)]
  bool b_per_token = false;      // 1 x 128 scales on B too (wgrad recipe; kDense, kKGrouped)
  const int32_t* row_layout = nullptr;  // masked_m [batch] | m_indices [batch, m] | ends [batch, G]
                                        // | group_k [G] (kKGrouped)
  const float* c = nullptr;      // optional float32 [batch, m, n] (kDense) or [G, m, n] (kKGrouped)
  OutType out = OutType::kBFloat16;
  void* d = nullptr;             // [batch, m, n] ([G, m, n] float32 for kKGrouped)
};

// The block shape and grid the heuristic picks (block_size.cc).
struct BlockConfig {
  int block_m = 128;
  int block_n = 128;
  int ctas = 1;       // persistent CTAs
  int64_t tiles = 0;  // tiles in the (upper-bound) tile space
};

// Deterministic choice of (block_m, block_n) and the CTA count; see block_size.cc.
BlockConfig choose_block_config(RowLayout layout, int64_t problems, int64_t m, int64_t n,
                                int num_sms);

// Most groups kContiguousEnds / kKGrouped support (their layout lives in shared memory).
constexpr int64_t kMaxContiguousEndsGroups = 2048;

// Checks what the kernels need beyond the CPU contract (k % 16, alignment,
// group count); "" when the problem is supported.
std::string unsupported(const Fp8GemmArgs& args);

// Enqueues the GEMM on `stream`: no allocation, no synchronization (CUDA-graph
// safe). Returns "" or an error message.
std::string fp8_gemm_sm90(const Fp8GemmArgs& args, int num_sms, cudaStream_t stream);

}  // namespace sm90
}  // namespace gemm
}  // namespace jaxinfra
