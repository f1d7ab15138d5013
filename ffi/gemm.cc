// CPU handlers of the FP8 GEMM custom calls: argument checks (gemm_args.h),
// then the reference loops in csrc/gemm/gemm_cpu.cc. The CUDA handlers to come
// register under the same targets with the same buffers and attributes.
#include "ffi/gemm_args.h"
#include "ffi/handlers.h"

namespace jaxinfra {
namespace ffi_gemm {
namespace {

ffi::Error Fp8GemmCpu(ffi::AnyBuffer a, ffi::AnyBuffer sfa, ffi::AnyBuffer b, ffi::AnyBuffer sfb,
                      std::optional<ffi::AnyBuffer> c, ffi::Result<ffi::AnyBuffer> d,
                      bool b_per_token) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(fp8_gemm_args(a, sfa, b, sfb, c, *d, b_per_token, &p));
  gemm::fp8_gemm_cpu(p.batch.size, p.m, p.n, p.k, u8(a), f32(sfa), u8(b), f32(sfb), b_per_token,
                     c ? f32(*c) : nullptr, p.out, d->untyped_data());
  return ffi::Error::Success();
}

ffi::Error GroupedFp8GemmMaskedCpu(ffi::AnyBuffer a, ffi::AnyBuffer sfa, ffi::AnyBuffer b,
                                   ffi::AnyBuffer sfb, ffi::AnyBuffer masked_m,
                                   ffi::Result<ffi::AnyBuffer> d) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(masked_args(a, sfa, b, sfb, masked_m, *d, &p));
  gemm::grouped_fp8_gemm_masked_cpu(p.batch.size, p.m, p.n, p.k, u8(a), f32(sfa), u8(b),
                                    f32(sfb), s32(masked_m), p.out, d->untyped_data());
  return ffi::Error::Success();
}

ffi::Error GroupedFp8GemmContiguousCpu(ffi::AnyBuffer a, ffi::AnyBuffer sfa, ffi::AnyBuffer b,
                                       ffi::AnyBuffer sfb, ffi::AnyBuffer layout,
                                       ffi::Result<ffi::AnyBuffer> d, bool psum,
                                       int64_t alignment) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(contiguous_args(a, sfa, b, sfb, layout, *d, psum, alignment, &p));
  gemm::grouped_fp8_gemm_contiguous_cpu(p.batch.size, p.m, p.n, p.k, p.groups, u8(a), f32(sfa),
                                        u8(b), f32(sfb), s32(layout), psum, alignment, p.out,
                                        d->untyped_data());
  return ffi::Error::Success();
}

ffi::Error KGroupedFp8GemmCpu(ffi::AnyBuffer a, ffi::AnyBuffer sfa, ffi::AnyBuffer b,
                              ffi::AnyBuffer sfb, ffi::AnyBuffer group_k,
                              std::optional<ffi::AnyBuffer> c, ffi::Result<ffi::AnyBuffer> d) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(k_grouped_args(a, sfa, b, sfb, group_k, c, *d, &p));
  gemm::k_grouped_fp8_gemm_cpu(p.batch.size, p.m, p.n, p.k, p.groups, u8(a), f32(sfa), u8(b),
                               f32(sfb), s32(group_k), c ? f32(*c) : nullptr,
                               static_cast<float*>(d->untyped_data()));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ffi_gemm
}  // namespace jaxinfra

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_fp8_gemm_cpu, jaxinfra::ffi_gemm::Fp8GemmCpu,
    jaxinfra::ffi_gemm::fp8_gemm_signature(
        ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_grouped_fp8_gemm_masked_cpu, jaxinfra::ffi_gemm::GroupedFp8GemmMaskedCpu,
    jaxinfra::ffi_gemm::grouped_fp8_gemm_masked_signature(
        ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_grouped_fp8_gemm_contiguous_cpu, jaxinfra::ffi_gemm::GroupedFp8GemmContiguousCpu,
    jaxinfra::ffi_gemm::grouped_fp8_gemm_contiguous_signature(
        ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_k_grouped_fp8_gemm_cpu, jaxinfra::ffi_gemm::KGroupedFp8GemmCpu,
    jaxinfra::ffi_gemm::k_grouped_fp8_gemm_signature(
        ffi::Ffi::Bind()));
