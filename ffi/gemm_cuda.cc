// CUDA handlers of the FP8 GEMM custom calls (Hopper, sm_90a): the same
// argument checks as the CPU handlers (gemm_args.h), then the kernels in
// csrc/gemm/sm90/ on XLA's stream. No allocation, no synchronization: safe in
// CUDA graphs (TMA descriptors are encoded on the host at each call and passed
// by value). Written without a GPU: compiled, never run; the ops list "cuda"
// as unverified, so impl="auto" never selects these (impl="ffi" does).
// All four GEMM targets: dense (per-block or per-token B scales), masked,
// contiguous, and k-grouped.
#include <cuda_runtime_api.h>

#include <string>

#include "ffi/gemm_args.h"
#include "ffi/handlers.h"
#include "gemm/sm90/fp8_gemm_sm90.h"

namespace jaxinfra {
namespace ffi_gemm {
namespace {

using gemm::sm90::Fp8GemmArgs;
using gemm::sm90::RowLayout;

// The current device's SM count (a host query; cached per device).
ffi::Error sm_count(int* count) {
  static int cached[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return ffi::Error::Internal("cudaGetDevice failed");
  if (device >= 0 && device < 64 && cached[device] > 0) {
    *count = cached[device];
    return ffi::Error::Success();
  }
  if (cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return ffi::Error::Internal("cudaDeviceGetAttribute(multiProcessorCount) failed");
  }
  if (device >= 0 && device < 64) cached[device] = *count;
  return ffi::Error::Success();
}

ffi::Error run(const char* op, const Fp8GemmArgs& args, cudaStream_t stream) {
  int sms = 0;
  JAXINFRA_GEMM_RETURN_IF_ERROR(sm_count(&sms));
  if (std::string why = gemm::sm90::unsupported(args); !why.empty()) {
    return ffi::Error::InvalidArgument(std::string(op) + " (CUDA): " + why);
  }
  if (std::string error = gemm::sm90::fp8_gemm_sm90(args, sms, stream); !error.empty()) {
    return ffi::Error::Internal(std::string(op) + " (CUDA): " + error);
  }
  return ffi::Error::Success();
}

Fp8GemmArgs common(const Problem& p, const ffi::AnyBuffer& a, const ffi::AnyBuffer& sfa,
                   const ffi::AnyBuffer& b, const ffi::AnyBuffer& sfb, ffi::AnyBuffer* d) {
  Fp8GemmArgs args;
  args.batch = p.batch.size;
  args.m = p.m;
  args.n = p.n;
  args.k = p.k;
  args.groups = p.groups;
  args.a = u8(a);
  args.sfa = f32(sfa);
  args.b = u8(b);
  args.sfb = f32(sfb);
  args.out = p.out;
  args.d = d->untyped_data();
  return args;
}

ffi::Error Fp8GemmCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sfa,
                       ffi::AnyBuffer b, ffi::AnyBuffer sfb, std::optional<ffi::AnyBuffer> c,
                       ffi::Result<ffi::AnyBuffer> d, bool b_per_token) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(fp8_gemm_args(a, sfa, b, sfb, c, *d, b_per_token, &p));
  Fp8GemmArgs args = common(p, a, sfa, b, sfb, &*d);
  args.layout = RowLayout::kDense;
  args.b_per_token = b_per_token;
  args.c = c ? f32(*c) : nullptr;
  return run("fp8_gemm", args, stream);
}

ffi::Error GroupedFp8GemmMaskedCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sfa,
                                    ffi::AnyBuffer b, ffi::AnyBuffer sfb,
                                    ffi::AnyBuffer masked_m, ffi::Result<ffi::AnyBuffer> d) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(masked_args(a, sfa, b, sfb, masked_m, *d, &p));
  Fp8GemmArgs args = common(p, a, sfa, b, sfb, &*d);
  args.layout = RowLayout::kMasked;
  args.row_layout = s32(masked_m);
  return run("grouped_fp8_gemm_masked", args, stream);
}

ffi::Error GroupedFp8GemmContiguousCuda(cudaStream_t stream, ffi::AnyBuffer a,
                                        ffi::AnyBuffer sfa, ffi::AnyBuffer b, ffi::AnyBuffer sfb,
                                        ffi::AnyBuffer layout, ffi::Result<ffi::AnyBuffer> d,
                                        bool psum, int64_t alignment) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(contiguous_args(a, sfa, b, sfb, layout, *d, psum, alignment, &p));
  Fp8GemmArgs args = common(p, a, sfa, b, sfb, &*d);
  args.layout = psum ? RowLayout::kContiguousEnds : RowLayout::kContiguousIndices;
  args.row_layout = s32(layout);
  args.alignment = alignment;
  return run("grouped_fp8_gemm_contiguous", args, stream);
}

ffi::Error KGroupedFp8GemmCuda(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer sfa,
                               ffi::AnyBuffer b, ffi::AnyBuffer sfb, ffi::AnyBuffer group_k,
                               std::optional<ffi::AnyBuffer> c, ffi::Result<ffi::AnyBuffer> d) {
  Problem p;
  JAXINFRA_GEMM_RETURN_IF_ERROR(k_grouped_args(a, sfa, b, sfb, group_k, c, *d, &p));
  Fp8GemmArgs args = common(p, a, sfa, b, sfb, &*d);
  args.layout = RowLayout::kKGrouped;
  args.b_per_token = true;
  args.out = gemm::OutType::kFloat32;
  args.row_layout = s32(group_k);
  args.c = c ? f32(*c) : nullptr;
  return run("k_grouped_fp8_gemm", args, stream);
}

}  // namespace
}  // namespace ffi_gemm
}  // namespace jaxinfra

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_fp8_gemm_cuda, jaxinfra::ffi_gemm::Fp8GemmCuda,
    jaxinfra::ffi_gemm::fp8_gemm_signature(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_grouped_fp8_gemm_masked_cuda, jaxinfra::ffi_gemm::GroupedFp8GemmMaskedCuda,
    jaxinfra::ffi_gemm::grouped_fp8_gemm_masked_signature(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_grouped_fp8_gemm_contiguous_cuda, jaxinfra::ffi_gemm::GroupedFp8GemmContiguousCuda,
    jaxinfra::ffi_gemm::grouped_fp8_gemm_contiguous_signature(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jaxinfra_k_grouped_fp8_gemm_cuda, jaxinfra::ffi_gemm::KGroupedFp8GemmCuda,
    jaxinfra::ffi_gemm::k_grouped_fp8_gemm_signature(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
