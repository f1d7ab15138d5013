// Reference loops for fine-grained FP8 quantization (see quant.h). Written for
// clarity: one pass computes each group's amax, a second pass multiplies by
// the group's inverse scale and rounds. The CPU FFI handlers in ffi/quant.cc
// call these.
#include "quant/quant.h"

#include "common/fp8_e4m3.h"

namespace jaxinfra {
namespace quant {
namespace {

// Element readers, one per input type; the loops are instantiated per type.
struct ReadF32 {
  static float at(const void* d, int64_t i) { return static_cast<const float*>(d)[i]; }
};
struct ReadBF16 {
  static float at(const void* d, int64_t i) {
    return fp8::bf16_bits_to_float(static_cast<const uint16_t*>(d)[i]);
  }
};
struct ReadF16 {
  static float at(const void* d, int64_t i) {
    return fp8::f16_bits_to_float(static_cast<const uint16_t*>(d)[i]);
  }
};
struct ReadF64 {
  static float at(const void* d, int64_t i) {
    return static_cast<float>(static_cast<const double*>(d)[i]);
  }
};

template <template <typename> class Loop, typename... Args>
void for_input_type(InputType type, Args... args) {
  switch (type) {
    case InputType::kFloat32: return Loop<ReadF32>::run(args...);
    case InputType::kBFloat16: return Loop<ReadBF16>::run(args...);
    case InputType::kFloat16: return Loop<ReadF16>::run(args...);
    case InputType::kFloat64: return Loop<ReadF64>::run(args...);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename Read>
struct PerTokenLoop {
  static void run(const void* x, int64_t rows, int64_t k, int64_t block, bool ue8m0, uint8_t* q,
                  float* scales) {
    const int64_t groups = ceil_div(k, block);
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t begin = row * k + g * block;
        const int64_t end = row * k + min64((g + 1) * block, k);
        float amax = 0.0f;
        for (int64_t i = begin; i < end; ++i) {
          amax = fp8::nan_max(amax, fp8::abs_f32(Read::at(x, i)));
        }
        const float scale = fp8::scale_from_amax(amax, ue8m0);
        const float inv_scale = fp8::inverse_scale(scale);
        scales[row * groups + g] = scale;
        for (int64_t i = begin; i < end; ++i) {
          q[i] = fp8::quantize_value(Read::at(x, i), inv_scale);
        }
      }
    }
  }
};

template <typename Read>
struct PerBlockLoop {
  static void run(const void* w, int64_t batch, int64_t n, int64_t k, int64_t block_n,
                  int64_t block_k, bool ue8m0, uint8_t* q, float* scales) {
    const int64_t row_blocks = ceil_div(n, block_n);
    const int64_t col_blocks = ceil_div(k, block_k);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const int64_t row_end = min64((rb + 1) * block_n, n);
        for (int64_t cb = 0; cb < col_blocks; ++cb) {
          const int64_t col_end = min64((cb + 1) * block_k, k);
          float amax = 0.0f;
          for (int64_t r = rb * block_n; r < row_end; ++r) {
            for (int64_t c = cb * block_k; c < col_end; ++c) {
              amax = fp8::nan_max(amax, fp8::abs_f32(Read::at(w, (b * n + r) * k + c)));
            }
          }
          const float scale = fp8::scale_from_amax(amax, ue8m0);
          const float inv_scale = fp8::inverse_scale(scale);
          scales[(b * row_blocks + rb) * col_blocks + cb] = scale;
          for (int64_t r = rb * block_n; r < row_end; ++r) {
            for (int64_t c = cb * block_k; c < col_end; ++c) {
              const int64_t i = (b * n + r) * k + c;
              q[i] = fp8::quantize_value(Read::at(w, i), inv_scale);
            }
          }
        }
      }
    }
  }
};

}  // namespace

void quantize_per_token_cpu(const void* x, InputType type, int64_t rows, int64_t k,
                            int64_t block, bool ue8m0, uint8_t* q, float* scales) {
  for_input_type<PerTokenLoop>(type, x, rows, k, block, ue8m0, q, scales);
}

void quantize_per_block_cpu(const void* w, InputType type, int64_t batch, int64_t n,
                            int64_t k, int64_t block_n, int64_t block_k, bool ue8m0,
                            uint8_t* q, float* scales) {
  for_input_type<PerBlockLoop>(type, w, batch, n, k, block_n, block_k, ue8m0, q, scales);
}

}  // namespace quant
}  // namespace jaxinfra
