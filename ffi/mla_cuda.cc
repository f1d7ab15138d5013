// CUDA handler of "jaxinfra_mla_decode" (Hopper, sm_90a; contract in mla.cc):
// the same operand checks as the CPU handler (mla_args.h), then the split-KV
// and combine kernels of csrc/mla/sm90/ on XLA's stream. The workspaces
// (o_accum, lse_accum) are results that XLA allocates; no allocation and no
// synchronization here, so the handler is CUDA-graph safe. The schedule
// (tile_metadata, num_splits) is not checked against the lengths on the host
// (that would need a device-to-host copy): the kernel clamps every index it
// reads from it. Written without a GPU: compiled, never run; mla_decode lists
// "cuda" as unverified, so impl="auto" never selects it (impl="ffi" does).
// bf16 q; bf16 cache (page 64, TMA) or the FP8 656-byte cache (any page size).
#include <cuda_runtime_api.h>

#include <string>

#include "ffi/handlers.h"
#include "ffi/mla_args.h"
#include "mla/sm90/mla_decode_sm90.h"

namespace jaxinfra {
namespace ffi_mla {
namespace {

ffi::Error MlaDecodeCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv_cache,
                         ffi::AnyBuffer block_table, ffi::AnyBuffer cache_seqlens,
                         ffi::AnyBuffer tile_metadata, ffi::AnyBuffer num_splits,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                         ffi::Result<ffi::AnyBuffer> o_accum,
                         ffi::Result<ffi::AnyBuffer> lse_accum, float softmax_scale,
                         bool causal) {
  mla::DecodeProblem problem;
  mla::DecodeBuffers buffers;
  if (auto err = decode_args(q, kv_cache, block_table, cache_seqlens, tile_metadata, num_splits,
                             *out, *lse, *o_accum, *lse_accum, softmax_scale, causal, &problem,
                             &buffers);
      err.failure()) {
    return err;
  }
  if (std::string why = mla::sm90::unsupported(problem); !why.empty()) {
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "mla_decode (CUDA): " + why);
  }
  if (std::string error = mla::sm90::mla_decode_sm90(problem, buffers, stream); !error.empty()) {
    return ffi::Error::Internal("mla_decode (CUDA): " + error);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ffi_mla
}  // namespace jaxinfra

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_mla_decode_cuda, jaxinfra::ffi_mla::MlaDecodeCuda,
    jaxinfra::ffi_mla::mla_decode_signature(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
