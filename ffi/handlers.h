// Every XLA FFI handler jaxinfra defines. A handler's symbol is its custom-call
// target name plus the platform: target "jaxinfra_<op>" is served on CPU by
// "jaxinfra_<op>_cpu" and on CUDA by "jaxinfra_<op>_cuda". The table that
// registers them is in module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_quantize_per_token_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_quantize_per_block_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_mla_decode_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_moe_permute_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_moe_unpermute_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_fp8_gemm_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_grouped_fp8_gemm_contiguous_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_grouped_fp8_gemm_masked_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_k_grouped_fp8_gemm_cpu);

#ifdef JAXINFRA_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_quantize_per_token_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_quantize_per_block_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_fp8_gemm_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_grouped_fp8_gemm_contiguous_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_grouped_fp8_gemm_masked_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_mla_decode_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jaxinfra_k_grouped_fp8_gemm_cuda);
#endif
