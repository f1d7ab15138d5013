// Reference CPU loops for the FP8 GEMMs (see gemm.h). Written for clarity
// first: every GEMM is a set of (rows of A, one B) problems handed to
// accumulate_rows, which performs DeepGEMM's two-level accumulation block by
// block along K. The CPU FFI handlers in ffi/gemm.cc call these.
#include "gemm/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace jaxinfra {
namespace gemm {
namespace {

// e4m3fn byte -> float32 (exact): sign, 4 exponent bits (bias 7), 3 mantissa
// bits; exponent 0 is subnormal (m * 2^-9); 0x7f / 0xff are NaN; no infinities.
float decode_e4m3(uint8_t byte) {
  const float sign = (byte & 0x80) ? -1.0f : 1.0f;
  const int exponent = (byte >> 3) & 0xf;
  const int mantissa = byte & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::nanf("");
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
}

struct E4M3Table {
  float value[256];
  E4M3Table() {
    for (int i = 0; i < 256; ++i) value[i] = decode_e4m3(static_cast<uint8_t>(i));
  }
};

const float* e4m3_table() {
  static const E4M3Table table;
  return table.value;
}

// float32 -> bfloat16 bits, round to nearest even (XLA's convert); NaN stays NaN.
uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if (v != v) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// The scales of one operand (see gemm.h for the two layouts).
struct Scales {
  const float* data;
  bool per_token;
  int64_t rows;
  int64_t k_blocks;
  float at(int64_t row, int64_t kb) const {
    return per_token ? data[kb * align_up(rows, kScaleAlign) + row]
                     : data[(row / kBlockN) * k_blocks + kb];
  }
};

int64_t scales_size(bool per_token, int64_t rows, int64_t k) {
  const int64_t k_blocks = ceil_div(k, kBlockK);
  return per_token ? k_blocks * align_up(rows, kScaleAlign) : ceil_div(rows, kBlockN) * k_blocks;
}

// One block's partial sum: 128 products (zero-padded), 8 float32 lanes.
float dot_block(const float* x, const float* y) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < kBlockK; i += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += x[i + l] * y[i + l];
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Decodes columns [k0, k1) of `rows` rows of an e4m3 [*, k] matrix into
// float32 blocks of kBlockK (zero-padded).
void decode_block(const uint8_t* x, int64_t k, const int64_t* rows, int64_t num_rows, int64_t k0,
                  int64_t k1, float* out) {
  const float* table = e4m3_table();
  for (int64_t i = 0; i < num_rows; ++i) {
    const uint8_t* src = x + (rows ? rows[i] : i) * k;
    float* dst = out + i * kBlockK;
    for (int64_t c = k0; c < k1; ++c) dst[c - k0] = table[src[c]];
    for (int64_t c = k1 - k0; c < kBlockK; ++c) dst[c] = 0.0f;
  }
}

// acc[i, j] += sum over K blocks in [k_begin, k_end) (k_begin a multiple of
// 128) of partial(rows[i], j) * (sa(rows[i], kb) * sb(j, kb)), in increasing kb.
// acc is float32 [num_rows, n].
void accumulate_rows(const uint8_t* a, const Scales& sa, const int64_t* rows, int64_t num_rows,
                     const uint8_t* b, const Scales& sb, int64_t n, int64_t k, int64_t k_begin,
                     int64_t k_end, float* acc) {
  if (num_rows == 0 || n == 0) return;
  std::vector<float> a_block(num_rows * kBlockK), b_block(n * kBlockK), b_scale(n);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    const int64_t k1 = k0 + kBlockK < k_end ? k0 + kBlockK : k_end;
    const int64_t kb = k0 / kBlockK;
    decode_block(a, k, rows, num_rows, k0, k1, a_block.data());
    decode_block(b, k, nullptr, n, k0, k1, b_block.data());
    for (int64_t j = 0; j < n; ++j) b_scale[j] = sb.at(j, kb);
    for (int64_t i = 0; i < num_rows; ++i) {
      const float a_scale = sa.at(rows ? rows[i] : i, kb);
      const float* x = a_block.data() + i * kBlockK;
      float* out = acc + i * n;
      for (int64_t j = 0; j < n; ++j) {
        out[j] += dot_block(x, b_block.data() + j * kBlockK) * (a_scale * b_scale[j]);
      }
    }
  }
}

// D row `row` = (C row +) acc row, rounded to the output type.
void store_row(const float* acc, const float* c, int64_t n, int64_t row, OutType out_type,
               void* d) {
  if (out_type == OutType::kFloat32) {
    float* out = static_cast<float*>(d) + row * n;
    for (int64_t j = 0; j < n; ++j) out[j] = c ? c[row * n + j] + acc[j] : acc[j];
  } else {
    uint16_t* out = static_cast<uint16_t*>(d) + row * n;
    for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits(c ? c[row * n + j] + acc[j] : acc[j]);
  }
}

void zero_rows(int64_t begin, int64_t end, int64_t n, OutType out_type, void* d) {
  const int64_t bytes = out_type == OutType::kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(d) + begin * n * bytes, 0, (end - begin) * n * bytes);
}

void* offset(void* d, int64_t elements, OutType out_type) {
  return static_cast<char*>(d) + elements * (out_type == OutType::kFloat32 ? 4 : 2);
}

// Rows `rows` of A against one B, over all of K; results stored to D.
void gemm_rows(const uint8_t* a, const Scales& sa, const std::vector<int64_t>& rows,
               const uint8_t* b, const Scales& sb, int64_t n, int64_t k, const float* c,
               OutType out_type, void* d) {
  std::vector<float> acc(rows.size() * n, 0.0f);
  accumulate_rows(a, sa, rows.data(), static_cast<int64_t>(rows.size()), b, sb, n, k, 0, k,
                  acc.data());
  for (size_t i = 0; i < rows.size(); ++i) store_row(acc.data() + i * n, c, n, rows[i], out_type, d);
}

std::vector<int64_t> first_rows(int64_t count) {
  std::vector<int64_t> rows(count);
  for (int64_t i = 0; i < count; ++i) rows[i] = i;
  return rows;
}

}  // namespace

void fp8_gemm_cpu(int64_t batch, int64_t m, int64_t n, int64_t k, const uint8_t* a,
                  const float* sfa, const uint8_t* b, const float* sfb, bool b_per_token,
                  const float* c, OutType out_type, void* d) {
  const int64_t k_blocks = ceil_div(k, kBlockK);
  const std::vector<int64_t> rows = first_rows(m);
  for (int64_t p = 0; p < batch; ++p) {
    const Scales sa{sfa + p * scales_size(true, m, k), true, m, k_blocks};
    const Scales sb{sfb + p * scales_size(b_per_token, n, k), b_per_token, n, k_blocks};
    gemm_rows(a + p * m * k, sa, rows, b + p * n * k, sb, n, k, c ? c + p * m * n : nullptr,
              out_type, offset(d, p * m * n, out_type));
  }
}

void grouped_fp8_gemm_masked_cpu(int64_t batch, int64_t m_max, int64_t n, int64_t k,
                                 const uint8_t* a, const float* sfa, const uint8_t* b,
                                 const float* sfb, const int32_t* masked_m, OutType out_type,
                                 void* d) {
  const int64_t k_blocks = ceil_div(k, kBlockK);
  for (int64_t p = 0; p < batch; ++p) {
    const int64_t rows = masked_rows(masked_m[p], m_max);
    const Scales sa{sfa + p * scales_size(true, m_max, k), true, m_max, k_blocks};
    const Scales sb{sfb + p * scales_size(false, n, k), false, n, k_blocks};
    void* dp = offset(d, p * m_max * n, out_type);
    gemm_rows(a + p * m_max * k, sa, first_rows(rows), b + p * n * k, sb, n, k, nullptr,
              out_type, dp);
    zero_rows(rows, m_max, n, out_type, dp);
  }
}

void grouped_fp8_gemm_contiguous_cpu(int64_t batch, int64_t m, int64_t n, int64_t k,
                                     int64_t groups, const uint8_t* a, const float* sfa,
                                     const uint8_t* b, const float* sfb, const int32_t* layout,
                                     bool psum, int64_t alignment, OutType out_type, void* d) {
  const int64_t k_blocks = ceil_div(k, kBlockK);
  for (int64_t p = 0; p < batch; ++p) {
    // Rows of each group, in increasing order.
    std::vector<std::vector<int64_t>> group_rows(groups);
    if (psum) {
      const int32_t* ends = layout + p * groups;
      int64_t previous_end = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t end = group_end(ends[g], previous_end, m);
        for (int64_t r = group_begin(previous_end, alignment); r < end; ++r) {
          group_rows[g].push_back(r);
        }
        previous_end = end;
      }
    } else {
      const int32_t* m_indices = layout + p * m;
      for (int64_t r = 0; r < m; ++r) {
        if (is_group(m_indices[r], groups)) group_rows[m_indices[r]].push_back(r);
      }
    }
    const Scales sa{sfa + p * scales_size(true, m, k), true, m, k_blocks};
    void* dp = offset(d, p * m * n, out_type);
    zero_rows(0, m, n, out_type, dp);
    for (int64_t g = 0; g < groups; ++g) {
      if (group_rows[g].empty()) continue;
      const int64_t bg = p * groups + g;
      const Scales sb{sfb + bg * scales_size(false, n, k), false, n, k_blocks};
      gemm_rows(a + p * m * k, sa, group_rows[g], b + bg * n * k, sb, n, k, nullptr, out_type,
                dp);
    }
  }
}

void k_grouped_fp8_gemm_cpu(int64_t batch, int64_t m, int64_t n, int64_t k_total,
                            int64_t groups, const uint8_t* a, const float* sfa,
                            const uint8_t* b, const float* sfb, const int32_t* group_k,
                            const float* c, float* d) {
  const int64_t k_blocks = ceil_div(k_total, kBlockK);
  const std::vector<int64_t> rows = first_rows(m);
  std::vector<float> acc(m * n);
  for (int64_t p = 0; p < batch; ++p) {
    const Scales sa{sfa + p * scales_size(true, m, k_total), true, m, k_blocks};
    const Scales sb{sfb + p * scales_size(true, n, k_total), true, n, k_blocks};
    int64_t start = 0;
    bool valid = true;
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t size = group_k[p * groups + g];
      valid = valid && k_group_ok(size, start, k_total);
      float* dg = d + (p * groups + g) * m * n;
      if (!valid) {
        for (int64_t i = 0; i < m * n; ++i) dg[i] = std::nanf("");
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      accumulate_rows(a + p * m * k_total, sa, rows.data(), m, b + p * n * k_total, sb, n,
                      k_total, start, start + size, acc.data());
      const float* cg = c ? c + (p * groups + g) * m * n : nullptr;
      for (int64_t r = 0; r < m; ++r) store_row(acc.data() + r * n, cg, n, r, OutType::kFloat32, dg);
      start += size;
    }
  }
}

}  // namespace gemm
}  // namespace jaxinfra
