// Custom-call target "jaxinfra_mla_decode": MLA decode over a paged latent
// cache (FlashMLA's dense decode, bf16 or FP8 cache). This file holds the CPU
// handler; a CUDA handler registers under the same target with this contract.
//
// Operands (all row-major, dense):
//   0 q              [b, s_q, h_q, 576]   bf16 (CPU also f32)
//   1 kv_cache       [num_blocks, 64, h_kv, 576] in q's dtype, or
//                    u8 [num_blocks, page, 1, 656] (DeepSeek-V3.2 FP8 records:
//                    512 e4m3 | 4 f32 power-of-two scales | 64 bf16 RoPE)
//   2 block_table    s32 [b, max_blocks]
//   3 cache_seqlens  s32 [b]
//   4 tile_metadata  s32 [num_sm_parts, 8]   from get_mla_metadata(cache_seqlens,
//   5 num_splits     s32 [b + 1]              s_q * h_q / h_kv, h_kv, num_sms)
// Results:
//   0 out            [b, s_q, h_q, 512]   q's dtype
//   1 lse            f32 [b, h_q, s_q]    natural log; +inf for rows without keys
//   2 o_accum        f32 [b + num_sm_parts, h_kv, s_q * h_q / h_kv, 512]  workspace
//   3 lse_accum      f32 [b + num_sm_parts, h_kv, s_q * h_q / h_kv]       workspace
// Attributes: softmax_scale (f32), causal (bool; bottom-right aligned, s_q > 1).
//
// num_sm_parts is the leading dimension of tile_metadata, so the caller sizes
// the schedule and the workspace for the device (the CUDA kernel launches
// num_sm_parts CTAs per (M block, KV head)); the workspace comes back as
// results so XLA allocates it, and callers drop it. Its content is
// implementation-defined: the CPU handler stores normalized partial outputs and
// natural-log partial lse of split requests at slots num_splits[r] + k (what
// jaxinfra.mla.split_kv_reference computes); a GPU kernel may store log2 lse.
//
// Data: jaxinfra.mla.mla_decode passes only sanitized lengths (requests with a
// length outside [0, max_blocks * 64] or a needed block id outside
// [0, num_blocks) are cut to length 0 and poisoned with NaN afterwards), so a
// kernel may trust operands 2-5 when called through it. This handler does not:
// it gives such requests NaN out and lse itself, reads only block-table slots
// below ceil(seqlen / page) and only pages in range, and returns
// InvalidArgument when the schedule does not partition the requests' tiles
// (instead of computing a wrong answer). Only shapes and dtypes are checked
// here; everything else is in csrc/mla/mla_cpu.cc.
#include <cstdint>
#include <initializer_list>
#include <string>

#include "ffi/handlers.h"
#include "ffi/mla_args.h"
#include "mla/mla.h"

namespace jaxinfra {
namespace ffi_mla {
namespace {

ffi::Error MlaDecodeCpu(ffi::AnyBuffer q, ffi::AnyBuffer kv_cache, ffi::AnyBuffer block_table,
                        ffi::AnyBuffer cache_seqlens, ffi::AnyBuffer tile_metadata,
                        ffi::AnyBuffer num_splits, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> o_accum,
                        ffi::Result<ffi::AnyBuffer> lse_accum, float softmax_scale, bool causal) {
  mla::DecodeProblem problem;
  mla::DecodeBuffers buffers;
  if (auto err = decode_args(q, kv_cache, block_table, cache_seqlens, tile_metadata, num_splits,
                             *out, *lse, *o_accum, *lse_accum, softmax_scale, causal, &problem,
                             &buffers);
      err.failure()) {
    return err;
  }
  const std::string schedule_error = mla::check_schedule(problem, buffers);
  if (!schedule_error.empty()) return ffi::Error::InvalidArgument("mla_decode: " + schedule_error);
  mla::mla_decode_cpu(problem, buffers);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ffi_mla
}  // namespace jaxinfra

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_mla_decode_cpu, jaxinfra::ffi_mla::MlaDecodeCpu,
    jaxinfra::ffi_mla::mla_decode_signature(
        ::xla::ffi::Ffi::Bind()));
