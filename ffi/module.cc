// jaxinfra._ffi: the one extension module. It exposes
//   registrations() -> {target name: {platform: PyCapsule(XLA_FFI_Handler*)}}
//   build_info()    -> what this build contains (CUDA, architectures, the XLA
//                      FFI API version of the headers it was compiled against)
// jaxinfra/_custom_call.py registers the capsules with jax.ffi on import.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "ffi/handlers.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

#ifdef JAXINFRA_WITH_CUDA
#define JAXINFRA_CUDA_HANDLER(symbol) symbol
#else
#define JAXINFRA_CUDA_HANDLER(symbol) nullptr
#endif

struct Target {
  const char* name;
  XLA_FFI_Handler* cpu;
  XLA_FFI_Handler* cuda;  // nullptr when built without CUDA
};

// The registrations table: one row per custom-call target.
const Target kTargets[] = {
    {"jaxinfra_quantize_per_token", jaxinfra_quantize_per_token_cpu,
     JAXINFRA_CUDA_HANDLER(jaxinfra_quantize_per_token_cuda)},
    {"jaxinfra_quantize_per_block", jaxinfra_quantize_per_block_cpu,
     JAXINFRA_CUDA_HANDLER(jaxinfra_quantize_per_block_cuda)},
    {"jaxinfra_mla_decode", jaxinfra_mla_decode_cpu, JAXINFRA_CUDA_HANDLER(jaxinfra_mla_decode_cuda)},
    {"jaxinfra_moe_permute", jaxinfra_moe_permute_cpu, nullptr},
    {"jaxinfra_moe_unpermute", jaxinfra_moe_unpermute_cpu, nullptr},
    {"jaxinfra_fp8_gemm", jaxinfra_fp8_gemm_cpu, JAXINFRA_CUDA_HANDLER(jaxinfra_fp8_gemm_cuda)},
    {"jaxinfra_grouped_fp8_gemm_contiguous", jaxinfra_grouped_fp8_gemm_contiguous_cpu,
     JAXINFRA_CUDA_HANDLER(jaxinfra_grouped_fp8_gemm_contiguous_cuda)},
    {"jaxinfra_grouped_fp8_gemm_masked", jaxinfra_grouped_fp8_gemm_masked_cpu,
     JAXINFRA_CUDA_HANDLER(jaxinfra_grouped_fp8_gemm_masked_cuda)},
    {"jaxinfra_k_grouped_fp8_gemm", jaxinfra_k_grouped_fp8_gemm_cpu,
     JAXINFRA_CUDA_HANDLER(jaxinfra_k_grouped_fp8_gemm_cuda)},
};

nb::capsule handler_capsule(XLA_FFI_Handler* handler) {
  return nb::capsule(reinterpret_cast<void*>(handler));
}

nb::dict registrations() {
  nb::dict targets;
  for (const Target& target : kTargets) {
    nb::dict platforms;
    platforms["cpu"] = handler_capsule(target.cpu);
    if (target.cuda != nullptr) platforms["CUDA"] = handler_capsule(target.cuda);
    targets[target.name] = platforms;
  }
  return targets;
}

nb::list split_list(const char* items) {
  nb::list out;
  std::string current;
  for (const char* c = items; *c != '\0'; ++c) {
    if (*c == ';' || *c == ',' || *c == ' ') {
      if (!current.empty()) out.append(current);
      current.clear();
    } else {
      current += *c;
    }
  }
  if (!current.empty()) out.append(current);
  return out;
}

nb::dict build_info() {
  nb::dict info;
#ifdef JAXINFRA_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::string(JAXINFRA_CUDA_VERSION);
  info["cuda_architectures"] = split_list(JAXINFRA_CUDA_ARCHITECTURES);
#else
  info["cuda"] = false;
  info["cuda_version"] = nb::none();
  info["cuda_architectures"] = nb::list();
#endif
  info["xla_ffi_api_version"] = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  info["jaxlib_headers_version"] = std::string(JAXINFRA_JAXLIB_HEADERS_VERSION);
  info["compiler"] = std::string(JAXINFRA_CXX_COMPILER);
  return info;
}

}  // namespace

NB_MODULE(_ffi, m) {
  m.doc() = "jaxinfra's XLA FFI handlers (see jaxinfra._custom_call).";
  m.def("registrations", &registrations,
        "Custom-call target name -> platform ('cpu', 'CUDA') -> handler capsule.");
  m.def("build_info", &build_info,
        "CUDA on/off, CUDA version, compiled architectures and FFI header version.");
}
