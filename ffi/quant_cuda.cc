// CUDA handlers of the quantization custom calls: the same argument checks as
// the CPU handlers, then the kernels in csrc/quant/quant_cuda.cu on XLA's
// stream. No allocation, no synchronization: safe inside CUDA graphs.
#include <cuda_runtime_api.h>

#include "ffi/handlers.h"
#include "ffi/quant_args.h"
#include "quant/quant_cuda.cuh"

namespace jaxinfra {
namespace ffi_quant {
namespace {

ffi::Error cuda_status(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(status));
}

ffi::Error QuantizePerTokenCuda(cudaStream_t stream, ffi::AnyBuffer x,
                                ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> scales, int64_t block, bool ue8m0) {
  QuantArgs args;
  if (auto err = per_token_args(x, *q, *scales, block, &args); err.failure()) return err;
  return cuda_status(
      quant::quantize_per_token_cuda(x.untyped_data(), args.type,
                                     args.shape.batch * args.shape.rows, args.shape.cols, block,
                                     ue8m0, static_cast<uint8_t*>(q->untyped_data()),
                                     static_cast<float*>(scales->untyped_data()), stream),
      "quantize_per_token_cuda");
}

ffi::Error QuantizePerBlockCuda(cudaStream_t stream, ffi::AnyBuffer w,
                                ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> scales, int64_t block_n,
                                int64_t block_k, bool ue8m0) {
  QuantArgs args;
  if (auto err = per_block_args(w, *q, *scales, block_n, block_k, &args); err.failure()) {
    return err;
  }
  return cuda_status(
      quant::quantize_per_block_cuda(w.untyped_data(), args.type, args.shape.batch,
                                     args.shape.rows, args.shape.cols, block_n, block_k, ue8m0,
                                     static_cast<uint8_t*>(q->untyped_data()),
                                     static_cast<float*>(scales->untyped_data()), stream),
      "quantize_per_block_cuda");
}

}  // namespace
}  // namespace ffi_quant
}  // namespace jaxinfra

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfra_quantize_per_token_cuda,
                              jaxinfra::ffi_quant::QuantizePerTokenCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("ue8m0"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfra_quantize_per_block_cuda,
                              jaxinfra::ffi_quant::QuantizePerBlockCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_n")
                                  .Attr<int64_t>("block_k")
                                  .Attr<bool>("ue8m0"),
                              {ffi::Traits::kCmdBufferCompatible});
