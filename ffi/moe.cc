// CPU handlers of the MoE permute/unpermute custom calls: argument checks,
// then the reference loops in csrc/moe/permute_cpu.cc. Every buffer's dtype
// and shape is checked, so a mismatched call returns InvalidArgument instead of
// touching memory outside its buffers; map entries outside [0, m) are skipped
// by the loops (documented behavior, not an error).
#include <string>

#include "ffi/handlers.h"
#include "moe/permute.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfra {
namespace ffi_moe {
namespace {

namespace ffi = ::xla::ffi;

std::string dims_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

bool is_sub_byte(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::PRED:
    case ffi::DataType::TOKEN:
    case ffi::DataType::INVALID:
      return true;
    default:
      return ffi::ByteWidth(dtype) == 0;
  }
}

// map must be int32 [n, d] with n = rows.
ffi::Error check_map(const ffi::AnyBuffer& map, int64_t rows, const char* rows_name) {
  const auto dims = map.dimensions();
  if (map.element_type() != ffi::DataType::S32 || dims.size() != 2 || dims[0] != rows) {
    return ffi::Error::InvalidArgument(std::string("row_id_map must be int32 [n, d] with n = ") +
                                       rows_name + " = " + std::to_string(rows) + ", got " +
                                       dims_str(dims));
  }
  return ffi::Error::Success();
}

ffi::Error PermuteCpu(ffi::AnyBuffer x, ffi::AnyBuffer map, ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2) {
    return ffi::Error::InvalidArgument("x must have rank 2, got " + dims_str(xd));
  }
  if (is_sub_byte(x.element_type())) {
    return ffi::Error::InvalidArgument("x must have a whole-byte element type");
  }
  if (out->element_type() != x.element_type() || od.size() != 2 || od[1] != xd[1]) {
    return ffi::Error::InvalidArgument("out must be [m, " + std::to_string(xd[1]) +
                                       "] with x's dtype, got " + dims_str(od));
  }
  if (auto err = check_map(map, xd[0], "x rows"); err.failure()) return err;
  const int64_t row_bytes = xd[1] * static_cast<int64_t>(ffi::ByteWidth(x.element_type()));
  moe::permute_rows_cpu(static_cast<const uint8_t*>(x.untyped_data()), xd[0],
                        map.dimensions()[1], row_bytes,
                        static_cast<const int32_t*>(map.untyped_data()), od[0],
                        static_cast<uint8_t*>(out->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error UnpermuteCpu(ffi::AnyBuffer y, ffi::AnyBuffer map, ffi::AnyBuffer weights,
                        ffi::Result<ffi::AnyBuffer> out) {
  const auto yd = y.dimensions();
  moe::FloatType type;
  switch (y.element_type()) {
    case ffi::DataType::F32: type = moe::FloatType::kFloat32; break;
    case ffi::DataType::BF16: type = moe::FloatType::kBFloat16; break;
    default: return ffi::Error::InvalidArgument("y must be float32 or bfloat16");
  }
  if (yd.size() != 2) {
    return ffi::Error::InvalidArgument("y must have rank 2, got " + dims_str(yd));
  }
  const auto od = out->dimensions();
  if (out->element_type() != y.element_type() || od.size() != 2 || od[1] != yd[1]) {
    return ffi::Error::InvalidArgument("out must be [n, " + std::to_string(yd[1]) +
                                       "] with y's dtype, got " + dims_str(od));
  }
  if (auto err = check_map(map, od[0], "out rows"); err.failure()) return err;
  const auto md = map.dimensions();
  const auto wd = weights.dimensions();
  if (weights.element_type() != ffi::DataType::F32 || wd.size() != 2 || wd[0] != md[0] ||
      wd[1] != md[1]) {
    return ffi::Error::InvalidArgument("weights must be float32 with row_id_map's shape " +
                                       dims_str(md) + ", got " + dims_str(wd));
  }
  moe::unpermute_rows_cpu(y.untyped_data(), type, yd[0], yd[1],
                          static_cast<const int32_t*>(map.untyped_data()),
                          static_cast<const float*>(weights.untyped_data()), md[0], md[1],
                          out->untyped_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ffi_moe
}  // namespace jaxinfra

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfra_moe_permute_cpu, jaxinfra::ffi_moe::PermuteCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfra_moe_unpermute_cpu, jaxinfra::ffi_moe::UnpermuteCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
