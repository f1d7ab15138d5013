// Argument checks shared by the CPU (mla.cc) and CUDA (mla_cuda.cc) handlers
// of "jaxinfra_mla_decode" (the buffer contract is documented in mla.cc).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "ffi/quant_args.h"
#include "mla/mla.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfra {
namespace ffi_mla {

namespace ffi = ::xla::ffi;
using ffi_quant::dims_str;

inline bool has_dims(const ffi::AnyBuffer& x, std::initializer_list<int64_t> want) {
  const auto dims = x.dimensions();
  if (dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t d : want) {
    if (dims[i++] != d) return false;
  }
  return true;
}

inline ffi::Error mismatch(const std::string& name, const std::string& want, const ffi::AnyBuffer& x) {
  return ffi::Error::InvalidArgument("mla_decode: " + name + " must be " + want + ", got shape " +
                                     dims_str(x.dimensions()));
}

// Fills problem from q and kv_cache; checks their dtypes and shapes.
inline ffi::Error query_and_cache(const ffi::AnyBuffer& q, const ffi::AnyBuffer& kv,
                           mla::DecodeProblem* problem) {
  if (q.element_type() == ffi::DataType::BF16) {
    problem->q_type = mla::FloatType::kBFloat16;
  } else if (q.element_type() == ffi::DataType::F32) {
    problem->q_type = mla::FloatType::kFloat32;
  } else {
    return ffi::Error::InvalidArgument("mla_decode: q must be bfloat16 or float32");
  }
  const auto qd = q.dimensions();
  if (qd.size() != 4 || qd[3] != mla::kQkDim || qd[0] < 1 || qd[1] < 1 || qd[2] < 1) {
    return mismatch("q", "[b, s_q, h_q, 576] with b, s_q, h_q >= 1", q);
  }
  problem->batch = qd[0];
  problem->s_q = qd[1];
  problem->h_q = qd[2];
  const auto kd = kv.dimensions();
  if (kd.size() != 4 || kd[0] < 1 || kd[1] < 1 || kd[2] < 1) {
    return mismatch("kv_cache", "rank 4 with non-empty dimensions", kv);
  }
  problem->num_blocks = kd[0];
  problem->page_size = kd[1];
  problem->h_kv = kd[2];
  if (kv.element_type() == ffi::DataType::U8) {
    problem->kv_format = mla::KvFormat::kFp8;
    if (kd[2] != 1 || kd[3] != mla::kFp8RecordBytes) {
      return mismatch("an fp8 kv_cache", "uint8 [num_blocks, page, 1, 656]", kv);
    }
  } else {
    problem->kv_format = mla::KvFormat::kUnquantized;
    if (kv.element_type() != q.element_type()) {
      return ffi::Error::InvalidArgument("mla_decode: kv_cache must have q's dtype, or be uint8");
    }
    if (kd[1] != mla::kTileKeys || kd[3] != mla::kQkDim) {
      return mismatch("kv_cache", "[num_blocks, 64, h_kv, 576]", kv);
    }
  }
  if (problem->h_q % problem->h_kv != 0) {
    return ffi::Error::InvalidArgument("mla_decode: h_q must be a multiple of h_kv");
  }
  return ffi::Error::Success();
}

inline ffi::Error int32_operands(const ffi::AnyBuffer& block_table, const ffi::AnyBuffer& seqlens,
                          const ffi::AnyBuffer& metadata, const ffi::AnyBuffer& num_splits,
                          mla::DecodeProblem* problem) {
  for (const ffi::AnyBuffer* x : {&block_table, &seqlens, &metadata, &num_splits}) {
    if (x->element_type() != ffi::DataType::S32) {
      return ffi::Error::InvalidArgument(
          "mla_decode: block_table, cache_seqlens, tile_metadata and num_splits must be int32");
    }
  }
  const int64_t b = problem->batch;
  const auto bt = block_table.dimensions();
  if (bt.size() != 2 || bt[0] != b || bt[1] < 1) {
    return mismatch("block_table", "[b, max_blocks >= 1]", block_table);
  }
  problem->max_blocks = bt[1];
  if (!has_dims(seqlens, {b})) return mismatch("cache_seqlens", "[b]", seqlens);
  const auto md = metadata.dimensions();
  if (md.size() != 2 || md[0] < 1 || md[1] != mla::kMetadataWidth) {
    return mismatch("tile_metadata", "[num_sm_parts >= 1, 8]", metadata);
  }
  problem->num_sm_parts = md[0];
  if (!has_dims(num_splits, {b + 1})) return mismatch("num_splits", "[b + 1]", num_splits);
  // Token indices are computed in int64, but the contract keeps them int32.
  if (problem->max_blocks * problem->page_size > INT32_MAX ||
      problem->num_blocks * problem->page_size > INT32_MAX) {
    return ffi::Error::InvalidArgument("mla_decode: token indices must fit int32");
  }
  return ffi::Error::Success();
}

inline ffi::Error results(const mla::DecodeProblem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& out,
                   const ffi::AnyBuffer& lse, const ffi::AnyBuffer& o_accum,
                   const ffi::AnyBuffer& lse_accum) {
  const int64_t rows = p.s_q * (p.h_q / p.h_kv), slots = p.batch + p.num_sm_parts;
  if (out.element_type() != q.element_type() || !has_dims(out, {p.batch, p.s_q, p.h_q, mla::kVDim})) {
    return mismatch("out", "[b, s_q, h_q, 512] in q's dtype", out);
  }
  if (lse.element_type() != ffi::DataType::F32 || !has_dims(lse, {p.batch, p.h_q, p.s_q})) {
    return mismatch("lse", "float32 [b, h_q, s_q]", lse);
  }
  if (o_accum.element_type() != ffi::DataType::F32 ||
      !has_dims(o_accum, {slots, p.h_kv, rows, mla::kVDim})) {
    return mismatch("o_accum", "float32 [b + num_sm_parts, h_kv, s_q * h_q / h_kv, 512]", o_accum);
  }
  if (lse_accum.element_type() != ffi::DataType::F32 ||
      !has_dims(lse_accum, {slots, p.h_kv, rows})) {
    return mismatch("lse_accum", "float32 [b + num_sm_parts, h_kv, s_q * h_q / h_kv]", lse_accum);
  }
  return ffi::Error::Success();
}

// Checks every operand and result and fills the problem and buffer pointers.
inline ffi::Error decode_args(const ffi::AnyBuffer& q, const ffi::AnyBuffer& kv_cache,
                              const ffi::AnyBuffer& block_table,
                              const ffi::AnyBuffer& cache_seqlens,
                              const ffi::AnyBuffer& tile_metadata, const ffi::AnyBuffer& num_splits,
                              ffi::AnyBuffer& out, ffi::AnyBuffer& lse, ffi::AnyBuffer& o_accum,
                              ffi::AnyBuffer& lse_accum, float softmax_scale, bool causal,
                              mla::DecodeProblem* problem, mla::DecodeBuffers* buffers) {
  if (auto err = query_and_cache(q, kv_cache, problem); err.failure()) return err;
  if (auto err = int32_operands(block_table, cache_seqlens, tile_metadata, num_splits, problem);
      err.failure()) {
    return err;
  }
  if (auto err = results(*problem, q, out, lse, o_accum, lse_accum); err.failure()) return err;
  problem->softmax_scale = softmax_scale;
  problem->causal = causal && problem->s_q > 1;
  buffers->q = q.untyped_data();
  buffers->kv = kv_cache.untyped_data();
  buffers->block_table = static_cast<const int32_t*>(block_table.untyped_data());
  buffers->seqlens = static_cast<const int32_t*>(cache_seqlens.untyped_data());
  buffers->tile_metadata = static_cast<const int32_t*>(tile_metadata.untyped_data());
  buffers->num_splits = static_cast<const int32_t*>(num_splits.untyped_data());
  buffers->out = out.untyped_data();
  buffers->lse = static_cast<float*>(lse.untyped_data());
  buffers->o_accum = static_cast<float*>(o_accum.untyped_data());
  buffers->lse_accum = static_cast<float*>(lse_accum.untyped_data());
  return ffi::Error::Success();
}


// mla_decode's operands, results and attributes, shared by the CPU binding (from
// ffi::Ffi::Bind()) and the CUDA binding (from Bind().Ctx<PlatformStream<...>>()).
template <typename Binding>
auto mla_decode_signature(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()  // kv_cache
      .template Arg<ffi::AnyBuffer>()  // block_table
      .template Arg<ffi::AnyBuffer>()  // cache_seqlens
      .template Arg<ffi::AnyBuffer>()  // tile_metadata
      .template Arg<ffi::AnyBuffer>()  // num_splits
      .template Ret<ffi::AnyBuffer>()  // out
      .template Ret<ffi::AnyBuffer>()  // lse
      .template Ret<ffi::AnyBuffer>()  // o_accum (workspace)
      .template Ret<ffi::AnyBuffer>()  // lse_accum (workspace)
      .template Attr<float>("softmax_scale")
      .template Attr<bool>("causal");
}

}  // namespace ffi_mla
}  // namespace jaxinfra
