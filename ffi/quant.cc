// CPU handlers of the quantization custom calls: argument checks, then the
// reference loops in csrc/quant/quant_cpu.cc.
#include "ffi/handlers.h"
#include "ffi/quant_args.h"

namespace jaxinfra {
namespace ffi_quant {
namespace {

ffi::Error QuantizePerTokenCpu(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                               ffi::Result<ffi::AnyBuffer> scales, int64_t block, bool ue8m0) {
  QuantArgs args;
  if (auto err = per_token_args(x, *q, *scales, block, &args); err.failure()) return err;
  quant::quantize_per_token_cpu(x.untyped_data(), args.type, args.shape.batch * args.shape.rows,
                                args.shape.cols, block, ue8m0,
                                static_cast<uint8_t*>(q->untyped_data()),
                                static_cast<float*>(scales->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error QuantizePerBlockCpu(ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> q,
                               ffi::Result<ffi::AnyBuffer> scales, int64_t block_n,
                               int64_t block_k, bool ue8m0) {
  QuantArgs args;
  if (auto err = per_block_args(w, *q, *scales, block_n, block_k, &args); err.failure()) {
    return err;
  }
  quant::quantize_per_block_cpu(w.untyped_data(), args.type, args.shape.batch, args.shape.rows,
                                args.shape.cols, block_n, block_k, ue8m0,
                                static_cast<uint8_t*>(q->untyped_data()),
                                static_cast<float*>(scales->untyped_data()));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ffi_quant
}  // namespace jaxinfra

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfra_quantize_per_token_cpu,
                              jaxinfra::ffi_quant::QuantizePerTokenCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("ue8m0"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfra_quantize_per_block_cpu,
                              jaxinfra::ffi_quant::QuantizePerBlockCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_n")
                                  .Attr<int64_t>("block_k")
                                  .Attr<bool>("ue8m0"));
