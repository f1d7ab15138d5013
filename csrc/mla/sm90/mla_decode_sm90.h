// Hopper (sm_90a) MLA decode over the paged latent cache (bf16, or FP8 records): the host API
// ffi/mla_cuda.cc calls. Same contract as mla.h (FlashMLA's split-KV schedule
// from jaxinfra.mla.get_mla_metadata, partial outputs, combine).
//
// Status: written and compiled for sm_90a, never run (no GPU was lent);
// docs/gpu-kernels.md lists what a GPU session must verify.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "mla/mla.h"

namespace jaxinfra {
namespace mla {
namespace sm90 {

// What the kernel supports beyond the CPU contract: bf16 q; a bf16 cache with
// page 64 or the FP8 656-byte cache with any page ("" when supported).
std::string unsupported(const DecodeProblem& problem);

// Enqueues the split-KV kernel and the combine kernel on `stream`; no
// allocation, no synchronization (CUDA-graph safe). The schedule is trusted
// only as far as memory safety: request, tile and slot indices read from it
// are clamped to their buffers (jaxinfra.mla.mla_decode passes the schedule it
// computed for these lengths; a foreign schedule gives wrong numbers, never
// out-of-bounds accesses). Returns "" or an error message.
std::string mla_decode_sm90(const DecodeProblem& problem, const DecodeBuffers& buffers,
                            cudaStream_t stream);

}  // namespace sm90
}  // namespace mla
}  // namespace jaxinfra
