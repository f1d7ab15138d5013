// Fine-grained-scaled FP8 GEMMs (DeepGEMM's contracts): the operand layouts,
// the rules that interpret data-dependent layout arrays, and the reference CPU
// loops. The CUDA kernels take the same buffers and must follow the same
// rules; the inline functions below are their single definition (host and
// device).
//
// Arithmetic (every implementation): D = C + sum over 128-wide K blocks kb of
//   (sum_{k in kb} A[i, k] * B[j, k]) * (sa(i, kb) * sb(j, kb))
// The inner sum is taken in float32 (e4m3 products are exact in float32; its
// order is the implementation's), each block's partial sum is multiplied once by
// the product of its two scales and added, block by block in increasing kb,
// into a float32 accumulator that starts at zero; C (float32, optional) is added
// last, then the result is rounded once to the output type. A partial last K
// block uses the columns it has.
//
// Layouts (row-major, dense; values are raw e4m3fn bytes):
//   A, B           [rows, k] e4m3 ("NT": both K-major, D = A @ B^T)
//   per-token scales (1 x 128, activations): MN-major and TMA-aligned,
//                  [ceil(k / 128), align(rows, 4)] float32; element (row, kb)
//                  at kb * align(rows, 4) + row. Columns >= rows are padding.
//   per-block scales (128 x 128, weights): [ceil(rows / 128), ceil(k / 128)]
//                  float32; element (row, kb) at (row / 128) * ceil(k/128) + kb.
//   D              [rows_a, rows_b] float32 or bfloat16 (round to nearest even).
// jaxinfra/gemm/_layout.py converts jaxinfra.quant's scales to these layouts.
#pragma once

#include <cstdint>

#include "common/fp8_e4m3.h"

namespace jaxinfra {
namespace gemm {

constexpr int64_t kBlockK = 128;     // scales are applied once per 128 K values
constexpr int64_t kBlockN = 128;     // weight scale tiles are 128 x 128
constexpr int64_t kScaleAlign = 4;   // MN-major scale rows: 16 bytes (TMA alignment)

enum class OutType { kFloat32, kBFloat16 };

JAXINFRA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
JAXINFRA_HD int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
JAXINFRA_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// --- Rules for data-dependent layout arrays (never read out of bounds) ----------------------

// Masked layout: problem p uses its first masked_m[p] rows, clamped to
// [0, m_max]; the other rows of D are zero.
JAXINFRA_HD int64_t masked_rows(int32_t masked_m, int64_t m_max) {
  return clamp64(masked_m, 0, m_max);
}

// Contiguous layout, m_indices form: row r multiplies B[m_indices[r]] when
// 0 <= m_indices[r] < groups; any other value (-1 marks padding) gives a zero row.
JAXINFRA_HD bool is_group(int32_t index, int64_t groups) { return index >= 0 && index < groups; }

// Contiguous layout, group_ends form (DeepGEMM's psum layout): the ends are
// clamped to [0, m] and made non-decreasing by a running maximum (an end below
// its predecessor makes that group empty); group g covers the rows
// [align_up(end[g-1], alignment), end[g]) (end[-1] = 0). Rows in no group are zero.
JAXINFRA_HD int64_t group_end(int32_t raw_end, int64_t previous_end, int64_t m) {
  const int64_t end = clamp64(raw_end, 0, m);
  return end > previous_end ? end : previous_end;
}
JAXINFRA_HD int64_t group_begin(int64_t previous_end, int64_t alignment) {
  return align_up(previous_end, alignment);
}

// K-grouped layout: group g contracts the K columns [start_g, start_g + group_k[g])
// with start_0 = 0 and start_{g+1} = start_g + group_k[g]. A group is valid when
// it and every group before it have group_k >= 0, a multiple of 128, and end
// within K; D[g] of an invalid group is NaN (an error value: the layout needs
// 128-aligned groups). K columns past the last group are ignored.
JAXINFRA_HD bool k_group_ok(int32_t group_k, int64_t start, int64_t k_total) {
  return group_k >= 0 && group_k % kBlockK == 0 && start + group_k <= k_total;
}

// --- Reference CPU loops -----------------------------------------------------------------------
// `batch` independent problems, stored one after another in every buffer.

// D[p] = C[p] + A[p] @ B[p]^T. A [m, k] with per-token scales; B [n, k] with
// per-block scales (b_per_token = false, the forward/dgrad recipe) or per-token
// scales (true, the wgrad recipe). c may be null.
void fp8_gemm_cpu(int64_t batch, int64_t m, int64_t n, int64_t k, const uint8_t* a,
                  const float* sfa, const uint8_t* b, const float* sfb, bool b_per_token,
                  const float* c, OutType out_type, void* d);

// Masked: problem p computes its first masked_rows(masked_m[p], m_max) rows of
// A[p] [m_max, k] @ B[p]^T ([n, k], per-block scales).
void grouped_fp8_gemm_masked_cpu(int64_t batch, int64_t m_max, int64_t n, int64_t k,
                                 const uint8_t* a, const float* sfa, const uint8_t* b,
                                 const float* sfb, const int32_t* masked_m, OutType out_type,
                                 void* d);

// Contiguous: A [m, k] rows grouped by expert, B [groups, n, k] with per-block
// scales [groups, ceil(n/128), ceil(k/128)]; layout is m_indices [m]
// (psum = false) or group_ends [groups] (psum = true, with `alignment`).
void grouped_fp8_gemm_contiguous_cpu(int64_t batch, int64_t m, int64_t n, int64_t k,
                                     int64_t groups, const uint8_t* a, const float* sfa,
                                     const uint8_t* b, const float* sfb, const int32_t* layout,
                                     bool psum, int64_t alignment, OutType out_type, void* d);

// K-grouped (MoE weight gradients): A [m, k_total], B [n, k_total], both with
// per-token scales; D [groups, m, n] float32 = C + A[:, seg_g] @ B[:, seg_g]^T.
void k_grouped_fp8_gemm_cpu(int64_t batch, int64_t m, int64_t n, int64_t k_total,
                            int64_t groups, const uint8_t* a, const float* sfa,
                            const uint8_t* b, const float* sfb, const int32_t* group_k,
                            const float* c, float* d);

}  // namespace gemm
}  // namespace jaxinfra
