// Fine-grained FP8 (e4m3fn) scaling arithmetic shared by the CPU reference
// loops and the CUDA kernels. Every function here is the single definition of
// one step of the quantization contract documented in jaxinfra/quant.py; the
// pure-JAX path implements the same steps with the same float32 operations, so
// the three implementations agree bit for bit.
//
// Plain C++ (and CUDA when compiled by nvcc): no XLA or Python headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define JAXINFRA_HD __host__ __device__ __forceinline__
#else
#define JAXINFRA_HD inline
#endif

namespace jaxinfra {
namespace fp8 {

// Largest finite e4m3fn value, and the amax floor DeepGEMM/DeepEP use so that
// an all-zero group gets a finite, non-zero scale.
constexpr float kE4M3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;
// The scale multiplies by float32(1/448) rather than dividing by 448: XLA
// rewrites division by a constant into this product, so this is the form all
// implementations can share exactly.
constexpr float kInvE4M3Max = 1.0f / 448.0f;
// Smallest normal e4m3fn magnitude (2^-6) and the subnormal spacing (2^-9).
constexpr float kE4M3MinNormal = 0.015625f;
constexpr float kE4M3SubnormalStep = 0.001953125f;

JAXINFRA_HD uint32_t float_bits(float v) {
  uint32_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

JAXINFRA_HD float bits_float(uint32_t b) {
  float v;
  memcpy(&v, &b, sizeof(v));
  return v;
}

JAXINFRA_HD bool is_nan(float v) { return v != v; }

// max() that propagates NaN from either side (XLA's max semantics); std::max
// and fmaxf drop NaNs, which would hide a poisoned group behind a finite scale.
JAXINFRA_HD float nan_max(float a, float b) {
  if (is_nan(a)) return a;
  if (is_nan(b)) return b;
  return a > b ? a : b;
}

JAXINFRA_HD float abs_f32(float v) { return bits_float(float_bits(v) & 0x7fffffffu); }

// Exact conversions of 16-bit floats to float32.
JAXINFRA_HD float bf16_bits_to_float(uint16_t h) {
  return bits_float(static_cast<uint32_t>(h) << 16);
}

JAXINFRA_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) {  // inf / nan
    return bits_float(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent != 0) {  // normal: rebias 15 -> 127
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  // zero or subnormal: mantissa * 2^-24, exact in float32.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
  return bits_float(sign | float_bits(magnitude));
}

// Scale of one group from its amax: max(amax, 1e-4) * float32(1/448),
// optionally rounded up to a power of two (UE8M0). NaN and +inf pass through.
JAXINFRA_HD float scale_from_amax(float amax, bool ue8m0) {
  const float scale = nan_max(amax, kAmaxFloor) * kInvE4M3Max;
  if (!ue8m0) return scale;
  const uint32_t b = float_bits(scale);
  if ((b & 0x7f800000u) == 0x7f800000u) return scale;  // inf / nan
  if ((b & 0x007fffffu) == 0) return scale;            // already 2^e
  return bits_float((b & 0x7f800000u) + 0x00800000u);  // next power of two
}

// Rounds a float32 to the nearest e4m3fn value (ties to even), saturating to
// +-448. NaN stays NaN. The result is exactly representable in e4m3fn.
JAXINFRA_HD float round_to_e4m3(float v) {
  if (is_nan(v)) return v;
  float r;
  if (abs_f32(v) < kE4M3MinNormal) {
    // Subnormal range: a multiple of 2^-9. v * 512 is exact, rint rounds half
    // to even in the default rounding mode, and the product back is exact.
#if defined(__CUDA_ARCH__)
    r = rintf(v * 512.0f) * kE4M3SubnormalStep;
#else
    r = std::nearbyint(v * 512.0f) * kE4M3SubnormalStep;
#endif
  } else {
    // Normal range: keep 3 mantissa bits, round to nearest even on bit 20.
    uint32_t b = float_bits(v);
    b = (b + 0x0007ffffu + ((b >> 20) & 1u)) & 0xfff00000u;
    r = bits_float(b);
  }
  if (r > kE4M3Max) return kE4M3Max;
  if (r < -kE4M3Max) return -kE4M3Max;
  return r;
}

// Encodes a value already on the e4m3fn grid (see round_to_e4m3) into its
// 8-bit pattern: 1 sign, 4 exponent (bias 7), 3 mantissa bits. NaN -> 0x7f
// with the sign kept.
JAXINFRA_HD uint8_t encode_e4m3(float r) {
  const uint32_t b = float_bits(r);
  const uint8_t sign = static_cast<uint8_t>((b >> 24) & 0x80u);
  if (is_nan(r)) return sign | 0x7fu;
  const float a = abs_f32(r);
  if (a < kE4M3MinNormal) {  // zero or subnormal: a = m * 2^-9, m in 0..7
    return sign | static_cast<uint8_t>(a * 512.0f);
  }
  const uint32_t exponent = ((b >> 23) & 0xffu) - 127u + 7u;  // 1..15
  const uint32_t mantissa = (b >> 20) & 0x7u;
  return sign | static_cast<uint8_t>((exponent << 3) | mantissa);
}

// The multiplier applied to a group: float32(1 / scale), one IEEE division per
// group. Elements are multiplied by it rather than divided by the scale
// because XLA rewrites x / broadcast(scale) into exactly this product.
JAXINFRA_HD float inverse_scale(float scale) { return 1.0f / scale; }

// One element of the contract: q = e4m3(x * inverse_scale).
JAXINFRA_HD uint8_t quantize_value(float x, float inv_scale) {
  return encode_e4m3(round_to_e4m3(x * inv_scale));
}

}  // namespace fp8
}  // namespace jaxinfra
