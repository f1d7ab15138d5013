// Argument checks shared by the CPU and CUDA quantization handlers. The Python
// wrappers validate the same facts at trace time; these checks make a handler
// called with a mismatched contract return an error instead of touching memory
// outside its buffers.
#pragma once

#include <cstdint>
#include <string>

#include "quant/quant.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfra {
namespace ffi_quant {

namespace ffi = ::xla::ffi;

inline std::string dims_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline ffi::Error input_type(ffi::DataType dtype, quant::InputType* type) {
  switch (dtype) {
    case ffi::DataType::F32: *type = quant::InputType::kFloat32; return ffi::Error::Success();
    case ffi::DataType::BF16: *type = quant::InputType::kBFloat16; return ffi::Error::Success();
    case ffi::DataType::F16: *type = quant::InputType::kFloat16; return ffi::Error::Success();
    case ffi::DataType::F64: *type = quant::InputType::kFloat64; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("input must be float32, bfloat16, float16 or float64");
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Leading dimensions folded into one batch: x [..., m, k] -> (batch, m, k).
struct Matrix3 {
  int64_t batch = 1, rows = 0, cols = 0;
};

inline ffi::Error check_block(const char* name, int64_t block) {
  if (block == 32 || block == 64 || block == 128) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(name) + " must be 32, 64 or 128, got " +
                                     std::to_string(block));
}

// Checks x [..., m, k], q [..., m, k] (e4m3fn) and
// scales [..., ceil(m / block_m), ceil(k / block_k)] (float32).
inline ffi::Error check_shapes(const ffi::AnyBuffer& x, const ffi::AnyBuffer& q,
                               const ffi::AnyBuffer& scales, int64_t block_m, int64_t block_k,
                               Matrix3* shape) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument("input must have rank >= 2, got " + dims_str(dims));
  }
  shape->batch = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) shape->batch *= dims[i];
  shape->rows = dims[dims.size() - 2];
  shape->cols = dims[dims.size() - 1];
  if (shape->cols <= 0) return ffi::Error::InvalidArgument("k must be positive");

  if (q.element_type() != ffi::DataType::F8E4M3FN || q.dimensions().size() != dims.size()) {
    return ffi::Error::InvalidArgument("q must be float8_e4m3fn with the input's shape");
  }
  for (size_t i = 0; i < dims.size(); ++i) {
    if (q.dimensions()[i] != dims[i]) {
      return ffi::Error::InvalidArgument("q shape " + dims_str(q.dimensions()) +
                                         " != input shape " + dims_str(dims));
    }
  }
  const auto sdims = scales.dimensions();
  bool ok = scales.element_type() == ffi::DataType::F32 && sdims.size() == dims.size();
  for (size_t i = 0; ok && i + 2 < dims.size(); ++i) ok = sdims[i] == dims[i];
  ok = ok && sdims[dims.size() - 2] == ceil_div(shape->rows, block_m) &&
       sdims[dims.size() - 1] == ceil_div(shape->cols, block_k);
  if (!ok) {
    return ffi::Error::InvalidArgument("scales must be float32 of shape [..., ceil(m/" +
                                       std::to_string(block_m) + "), ceil(k/" +
                                       std::to_string(block_k) + ")], got " + dims_str(sdims));
  }
  return ffi::Error::Success();
}

// Everything a handler needs to call a kernel, after all checks passed.
struct QuantArgs {
  quant::InputType type = quant::InputType::kFloat32;
  Matrix3 shape;
};

// Checks a quantize_per_token call: x [..., m, k] -> q, scales [..., m, ceil(k/block)].
inline ffi::Error per_token_args(const ffi::AnyBuffer& x, const ffi::AnyBuffer& q,
                                 const ffi::AnyBuffer& scales, int64_t block, QuantArgs* args) {
  if (auto err = check_block("block", block); err.failure()) return err;
  if (auto err = input_type(x.element_type(), &args->type); err.failure()) return err;
  return check_shapes(x, q, scales, 1, block, &args->shape);
}

// Checks a quantize_per_block call: w [..., n, k] -> q,
// scales [..., ceil(n/block_n), ceil(k/block_k)].
inline ffi::Error per_block_args(const ffi::AnyBuffer& w, const ffi::AnyBuffer& q,
                                 const ffi::AnyBuffer& scales, int64_t block_n, int64_t block_k,
                                 QuantArgs* args) {
  if (auto err = check_block("block_n", block_n); err.failure()) return err;
  if (auto err = check_block("block_k", block_k); err.failure()) return err;
  if (auto err = input_type(w.element_type(), &args->type); err.failure()) return err;
  return check_shapes(w, q, scales, block_n, block_k, &args->shape);
}

}  // namespace ffi_quant
}  // namespace jaxinfra
