// Reference loops for the MoE permute/unpermute custom calls (see permute.h).
#include "moe/permute.h"

#include <cstring>
#include <vector>

#include "common/fp8_e4m3.h"

namespace jaxinfra {
namespace moe {
namespace {

// float32 -> bfloat16 bits, round to nearest even (XLA's convert); NaN stays a
// quiet NaN of the same sign.
uint16_t float_to_bf16_bits(float v) {
  const uint32_t bits = fp8::float_bits(v);
  if (fp8::is_nan(v)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7fffu + lsb) >> 16);
}

struct F32 {
  static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static void store(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
};

struct BF16 {
  static float load(const void* p, int64_t i) {
    return fp8::bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  static void store(void* p, int64_t i, float v) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
  }
};

template <typename T>
void unpermute(const void* y, int64_t m, int64_t h, const int32_t* map, const float* weights,
               int64_t n, int64_t d, void* out) {
  std::vector<float> acc(static_cast<size_t>(h));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < h; ++c) acc[c] = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t row = map[i * d + j];
      if (row >= 0 && row < m) {
        const float w = weights[i * d + j];
        for (int64_t c = 0; c < h; ++c) {
          const float term = w * T::load(y, row * h + c);
          acc[c] = acc[c] + term;
        }
      } else {
        // The pure-JAX path adds an explicit zero; so do we (it turns -0 into +0).
        for (int64_t c = 0; c < h; ++c) acc[c] = acc[c] + 0.0f;
      }
    }
    for (int64_t c = 0; c < h; ++c) T::store(out, i * h + c, acc[c]);
  }
}

}  // namespace

void permute_rows_cpu(const uint8_t* x, int64_t n, int64_t d, int64_t row_bytes,
                      const int32_t* map, int64_t m, uint8_t* out) {
  if (m > 0 && row_bytes > 0) std::memset(out, 0, static_cast<size_t>(m * row_bytes));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const int64_t row = map[i * d + j];
      if (row < 0 || row >= m) continue;
      std::memcpy(out + row * row_bytes, x + i * row_bytes, static_cast<size_t>(row_bytes));
    }
  }
}

void unpermute_rows_cpu(const void* y, FloatType type, int64_t m, int64_t h, const int32_t* map,
                        const float* weights, int64_t n, int64_t d, void* out) {
  switch (type) {
    case FloatType::kFloat32: return unpermute<F32>(y, m, h, map, weights, n, d, out);
    case FloatType::kBFloat16: return unpermute<BF16>(y, m, h, map, weights, n, d, out);
  }
}

}  // namespace moe
}  // namespace jaxinfra
