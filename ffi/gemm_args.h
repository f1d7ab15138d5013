// Argument checks shared by the CPU (and, to come, CUDA) handlers of the FP8
// GEMM custom calls. The Python wrappers validate the same facts at trace
// time; these checks make a handler called with a mismatched contract return
// an error instead of touching memory outside its buffers. Leading dimensions
// (added by vmap) must be equal across operands and are folded into a batch.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ffi/quant_args.h"
#include "gemm/gemm.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfra {
namespace ffi_gemm {

namespace ffi = ::xla::ffi;

// "[d0, d1, ...]" of buffer dimensions or of a std::vector (shared with quant).
using ffi_quant::dims_str;

inline const char* type_name(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F8E4M3FN: return "float8_e4m3fn";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::S32: return "int32";
    default: return "another type";
  }
}

// Typed pointers to a buffer's data (the handlers check the dtype first).
inline const uint8_t* u8(const ffi::AnyBuffer& x) {
  return static_cast<const uint8_t*>(x.untyped_data());
}
inline const float* f32(const ffi::AnyBuffer& x) {
  return static_cast<const float*>(x.untyped_data());
}
inline const int32_t* s32(const ffi::AnyBuffer& x) {
  return static_cast<const int32_t*>(x.untyped_data());
}

// The leading (batch) dimensions of the first operand, which every other
// operand must share, and their product.
struct Batch {
  std::vector<int64_t> dims;
  int64_t size = 1;
};

// Checks that `x` has type `dtype` and shape [*batch, *trailing].
inline ffi::Error check(const char* name, const ffi::AnyBuffer& x, ffi::DataType dtype,
                        const Batch& batch, std::initializer_list<int64_t> trailing) {
  std::vector<int64_t> want(batch.dims);
  want.insert(want.end(), trailing.begin(), trailing.end());
  const auto dims = x.dimensions();
  bool ok = x.element_type() == dtype && dims.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = dims[i] == want[i];
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(name) + " must be " + type_name(dtype) + " " +
                                     dims_str(want) + ", got " +
                                     type_name(x.element_type()) + " " + dims_str(dims));
}

// Reads `x` [*batch, trailing...] with `trailing_rank` trailing dimensions:
// its batch and trailing dims. Fails when the rank is too small.
inline ffi::Error leading(const char* name, const ffi::AnyBuffer& x, size_t trailing_rank,
                          Batch* batch, std::vector<int64_t>* trailing) {
  const auto dims = x.dimensions();
  if (dims.size() < trailing_rank) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have rank >= " +
                                       std::to_string(trailing_rank) + ", got " + dims_str(dims));
  }
  batch->dims.assign(dims.begin(), dims.end() - trailing_rank);
  batch->size = 1;
  for (int64_t d : batch->dims) batch->size *= d;
  trailing->assign(dims.end() - trailing_rank, dims.end());
  return ffi::Error::Success();
}

inline ffi::Error out_type(const ffi::AnyBuffer& d, bool float32_only, gemm::OutType* type) {
  if (d.element_type() == ffi::DataType::F32) {
    *type = gemm::OutType::kFloat32;
  } else if (d.element_type() == ffi::DataType::BF16 && !float32_only) {
    *type = gemm::OutType::kBFloat16;
  } else {
    return ffi::Error::InvalidArgument(
        std::string("d must be ") + (float32_only ? "float32" : "float32 or bfloat16") +
        ", got " + type_name(d.element_type()));
  }
  return ffi::Error::Success();
}

inline int64_t k_blocks(int64_t k) { return gemm::ceil_div(k, gemm::kBlockK); }
inline int64_t mn_major(int64_t rows) { return gemm::align_up(rows, gemm::kScaleAlign); }
inline int64_t n_blocks(int64_t n) { return gemm::ceil_div(n, gemm::kBlockN); }

// The problem sizes every GEMM shares.
struct Problem {
  Batch batch;          // vmap dimensions (and the group dimension of the masked layout)
  int64_t m = 0, n = 0, k = 0, groups = 1;
  gemm::OutType out = gemm::OutType::kFloat32;
};

#define JAXINFRA_GEMM_RETURN_IF_ERROR(expr)           \
  do {                                           \
    if (auto err = (expr); err.failure()) return err; \
  } while (0)

// a [..., m, k] e4m3 and its per-token scales [..., KB, align(m, 4)].
inline ffi::Error check_a(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sfa, Problem* p) {
  std::vector<int64_t> mk;
  JAXINFRA_GEMM_RETURN_IF_ERROR(leading("a", a, 2, &p->batch, &mk));
  p->m = mk[0];
  p->k = mk[1];
  if (p->k <= 0) return ffi::Error::InvalidArgument("a must have k > 0");
  JAXINFRA_GEMM_RETURN_IF_ERROR(check("a", a, ffi::DataType::F8E4M3FN, p->batch, {p->m, p->k}));
  return check("sfa", sfa, ffi::DataType::F32, p->batch, {k_blocks(p->k), mn_major(p->m)});
}

// fp8_gemm: a, sfa, b [..., n, k], sfb, optional c [..., m, n] f32, d [..., m, n].
inline ffi::Error fp8_gemm_args(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sfa,
                                const ffi::AnyBuffer& b, const ffi::AnyBuffer& sfb,
                                const std::optional<ffi::AnyBuffer>& c, const ffi::AnyBuffer& d,
                                bool b_per_token, Problem* p) {
  JAXINFRA_GEMM_RETURN_IF_ERROR(check_a(a, sfa, p));
  const auto bdims = b.dimensions();
  p->n = bdims.size() >= 2 ? bdims[bdims.size() - 2] : -1;
  JAXINFRA_GEMM_RETURN_IF_ERROR(check("b", b, ffi::DataType::F8E4M3FN, p->batch, {p->n, p->k}));
  if (b_per_token) {
    JAXINFRA_GEMM_RETURN_IF_ERROR(
        check("sfb", sfb, ffi::DataType::F32, p->batch, {k_blocks(p->k), mn_major(p->n)}));
  } else {
    JAXINFRA_GEMM_RETURN_IF_ERROR(
        check("sfb", sfb, ffi::DataType::F32, p->batch, {n_blocks(p->n), k_blocks(p->k)}));
  }
  JAXINFRA_GEMM_RETURN_IF_ERROR(out_type(d, c.has_value(), &p->out));
  if (c) JAXINFRA_GEMM_RETURN_IF_ERROR(check("c", *c, ffi::DataType::F32, p->batch, {p->m, p->n}));
  return check("d", d, d.element_type(), p->batch, {p->m, p->n});
}

// Masked: a [..., m_max, k], b [..., n, k], masked_m [...] int32, d [..., m_max, n].
inline ffi::Error masked_args(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sfa,
                              const ffi::AnyBuffer& b, const ffi::AnyBuffer& sfb,
                              const ffi::AnyBuffer& masked_m, const ffi::AnyBuffer& d,
                              Problem* p) {
  std::optional<ffi::AnyBuffer> no_c;
  JAXINFRA_GEMM_RETURN_IF_ERROR(fp8_gemm_args(a, sfa, b, sfb, no_c, d, false, p));
  return check("masked_m", masked_m, ffi::DataType::S32, p->batch, {});
}

// Contiguous: a [..., m, k], b [..., G, n, k], sfb [..., G, nb, KB], layout
// [..., m] (m_indices) or [..., G] (group_ends), d [..., m, n].
inline ffi::Error contiguous_args(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sfa,
                                  const ffi::AnyBuffer& b, const ffi::AnyBuffer& sfb,
                                  const ffi::AnyBuffer& layout, const ffi::AnyBuffer& d,
                                  bool psum, int64_t alignment, Problem* p) {
  JAXINFRA_GEMM_RETURN_IF_ERROR(check_a(a, sfa, p));
  const auto bdims = b.dimensions();
  if (bdims.size() != p->batch.dims.size() + 3) {
    return ffi::Error::InvalidArgument("b must be [..., groups, n, k], got " + dims_str(bdims));
  }
  p->groups = bdims[bdims.size() - 3];
  p->n = bdims[bdims.size() - 2];
  JAXINFRA_GEMM_RETURN_IF_ERROR(
      check("b", b, ffi::DataType::F8E4M3FN, p->batch, {p->groups, p->n, p->k}));
  JAXINFRA_GEMM_RETURN_IF_ERROR(check("sfb", sfb, ffi::DataType::F32, p->batch,
                                 {p->groups, n_blocks(p->n), k_blocks(p->k)}));
  JAXINFRA_GEMM_RETURN_IF_ERROR(
      check(psum ? "group_ends" : "m_indices", layout, ffi::DataType::S32, p->batch,
            {psum ? p->groups : p->m}));
  if (alignment < 1) return ffi::Error::InvalidArgument("alignment must be >= 1");
  JAXINFRA_GEMM_RETURN_IF_ERROR(out_type(d, false, &p->out));
  return check("d", d, d.element_type(), p->batch, {p->m, p->n});
}

// K-grouped: a [..., m, K], sfa, b [..., n, K], sfb [..., KB, align(n, 4)],
// group_k [..., G] int32, optional c [..., G, m, n] f32, d [..., G, m, n] f32.
inline ffi::Error k_grouped_args(const ffi::AnyBuffer& a, const ffi::AnyBuffer& sfa,
                                 const ffi::AnyBuffer& b, const ffi::AnyBuffer& sfb,
                                 const ffi::AnyBuffer& group_k,
                                 const std::optional<ffi::AnyBuffer>& c,
                                 const ffi::AnyBuffer& d, Problem* p) {
  JAXINFRA_GEMM_RETURN_IF_ERROR(check_a(a, sfa, p));
  const auto bdims = b.dimensions();
  p->n = bdims.size() >= 2 ? bdims[bdims.size() - 2] : -1;
  JAXINFRA_GEMM_RETURN_IF_ERROR(check("b", b, ffi::DataType::F8E4M3FN, p->batch, {p->n, p->k}));
  JAXINFRA_GEMM_RETURN_IF_ERROR(
      check("sfb", sfb, ffi::DataType::F32, p->batch, {k_blocks(p->k), mn_major(p->n)}));
  const auto gdims = group_k.dimensions();
  p->groups = gdims.size() >= 1 ? gdims[gdims.size() - 1] : -1;
  JAXINFRA_GEMM_RETURN_IF_ERROR(check("group_k", group_k, ffi::DataType::S32, p->batch, {p->groups}));
  if (c) {
    JAXINFRA_GEMM_RETURN_IF_ERROR(
        check("c", *c, ffi::DataType::F32, p->batch, {p->groups, p->m, p->n}));
  }
  return check("d", d, ffi::DataType::F32, p->batch, {p->groups, p->m, p->n});
}


// The operands, results and attributes of each GEMM target, shared by its CPU binding
// (from ffi::Ffi::Bind()) and its CUDA binding (from Bind().Ctx<PlatformStream<...>>()).

template <typename Binding>
auto fp8_gemm_signature(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // a
      .template Arg<ffi::AnyBuffer>()  // sfa
      .template Arg<ffi::AnyBuffer>()  // b
      .template Arg<ffi::AnyBuffer>()  // sfb
      .template OptionalArg<ffi::AnyBuffer>()  // c (aliased with d)
      .template Ret<ffi::AnyBuffer>()  // d
      .template Attr<bool>("b_per_token");
}

template <typename Binding>
auto grouped_fp8_gemm_masked_signature(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // a
      .template Arg<ffi::AnyBuffer>()  // sfa
      .template Arg<ffi::AnyBuffer>()  // b
      .template Arg<ffi::AnyBuffer>()  // sfb
      .template Arg<ffi::AnyBuffer>()  // masked_m
      .template Ret<ffi::AnyBuffer>();  // d
}

template <typename Binding>
auto grouped_fp8_gemm_contiguous_signature(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // a
      .template Arg<ffi::AnyBuffer>()  // sfa
      .template Arg<ffi::AnyBuffer>()  // b
      .template Arg<ffi::AnyBuffer>()  // sfb
      .template Arg<ffi::AnyBuffer>()  // m_indices or group_ends
      .template Ret<ffi::AnyBuffer>()  // d
      .template Attr<bool>("psum")
      .template Attr<int64_t>("alignment");
}

template <typename Binding>
auto k_grouped_fp8_gemm_signature(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // a
      .template Arg<ffi::AnyBuffer>()  // sfa
      .template Arg<ffi::AnyBuffer>()  // b
      .template Arg<ffi::AnyBuffer>()  // sfb
      .template Arg<ffi::AnyBuffer>()  // group_k
      .template OptionalArg<ffi::AnyBuffer>()  // c (aliased with d)
      .template Ret<ffi::AnyBuffer>();  // d
}

}  // namespace ffi_gemm
}  // namespace jaxinfra
