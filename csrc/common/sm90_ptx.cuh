// Hopper (sm_90a) building blocks shared by the GEMM and MLA kernels: mbarrier
// pipelines, TMA (cp.async.bulk.tensor) loads, wgmma descriptors and fences,
// setmaxnreg, and the host-side tensor-map encoder. Thin wrappers over PTX;
// the wgmma instructions themselves come from CuTe's arch-level atoms
// (cute/arch/mma_sm90_gmma*.hpp), called through wgmma_call below.
//
// Written without a GPU: compiled for sm_90a, never run (docs/gpu-kernels.md).
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only; the driver is reached at run time)
#include <cuda_runtime_api.h>

#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/mma_sm90_gmma_ext.hpp>

#if defined(__CUDA_ARCH__) && !defined(CUTE_ARCH_MMA_SM90A_ENABLED)
#error "jaxinfra's Hopper kernels need the sm_90a target (JAXINFRA_CUDA_ARCHITECTURES=90a-real)"
#endif

namespace jaxinfra {
namespace sm90 {

// --- thread roles ----------------------------------------------------------------------------

constexpr int kWarpSize = 32;
constexpr int kWarpgroupThreads = 128;

__device__ __forceinline__ int warpgroup_index() { return threadIdx.x / kWarpgroupThreads; }
__device__ __forceinline__ int lane_index() { return threadIdx.x % kWarpSize; }

// Lowers (kDealloc) or raises this warpgroup's register budget; the kernel
// must be compiled with a register cap (__launch_bounds__(threads, 1)).
template <int kRegisters>
__device__ __forceinline__ void set_registers_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void set_registers_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Named barrier among `threads` threads (a multiple of 32), id 1..15 (0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// --- mbarrier ------------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(arrivals));
}

// Makes initialized barriers visible to the async (TMA) proxy.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
          smem_address(bar))
      : "memory");
}

// One arrival that also announces `bytes` of TMA transactions to wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
          smem_address(bar)),
      "r"(bytes)
      : "memory");
}

// Spins until the barrier's phase with parity `phase` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_address(bar)),
      "r"(phase)
      : "memory");
}

// --- TMA ---------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// 2-D tile load: box at (c0 = innermost coordinate, c1) into smem, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(const CUtensorMap* map, uint64_t* bar, void* smem,
                                            int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_address(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// 3-D tile load (c0 innermost).
__device__ __forceinline__ void tma_load_3d(const CUtensorMap* map, uint64_t* bar, void* smem,
                                            int32_t c0, int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_address(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// Ordinary shared-memory stores that wgmma or TMA read next need this fence.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// --- wgmma -------------------------------------------------------------------------------------

// Shared-memory matrix descriptor of a K-major operand stored with the 128-byte
// swizzle (rows of 128 bytes, 8-row / 1024-byte swizzle atoms, atoms stacked
// along M/N): start address, stride between 8-row groups = 1024 bytes. The
// atom must be 1024-byte aligned; moving along K inside the 128-byte row adds
// bytes / 16 to the start address (the hardware applies the swizzle).
__device__ __forceinline__ uint64_t kmajor_sw128_descriptor(const void* smem) {
  cute::GmmaDescriptor desc;
  desc.bitfield.start_address_ = static_cast<uint16_t>(smem_address(smem) >> 4);
  desc.bitfield.leading_byte_offset_ = 1;           // unused for swizzled K-major
  desc.bitfield.stride_byte_offset_ = 1024 >> 4;    // next 8-row group
  desc.bitfield.base_offset_ = 0;
  desc.bitfield.layout_type_ = 1;                   // SWIZZLE_128B
  return desc.desc_;
}
__device__ __forceinline__ uint64_t advance_descriptor(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

__device__ __forceinline__ void wgmma_fence_operands() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across async wgmma.
template <int kN>
__device__ __forceinline__ void fence_registers(float (&acc)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

// Calls a CuTe SS wgmma atom `Atom::fma(desc_a, desc_b, acc[0], ..., acc[N-1], scale_d)`.
template <typename Atom, int kN, size_t... kIs>
__device__ __forceinline__ void wgmma_call_impl(uint64_t desc_a, uint64_t desc_b,
                                                float (&acc)[kN], bool accumulate,
                                                std::index_sequence<kIs...>) {
  Atom::fma(desc_a, desc_b, acc[kIs]...,
            accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
template <typename Atom, int kN>
__device__ __forceinline__ void wgmma_ss(uint64_t desc_a, uint64_t desc_b, float (&acc)[kN],
                                         bool accumulate) {
  wgmma_call_impl<Atom>(desc_a, desc_b, acc, accumulate, std::make_index_sequence<kN>{});
}

}  // namespace sm90
}  // namespace jaxinfra

#include "common/sm90_ptx_host.h"
