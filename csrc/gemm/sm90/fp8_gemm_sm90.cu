// Hopper FP8 GEMM kernels (dense, masked, contiguous) with DeepGEMM's
// fine-grained scaling and two-level accumulation.
//
// One CTA per SM, persistent over tiles (tile_scheduler.cuh). Warpgroups:
//   math 0..W-1  (W = block_m / 64): warpgroup w owns tile rows [64w, 64w + 64);
//                per 128-wide K block ("stage") it issues four
//                wgmma.m64n{block_n}k32.f32.e4m3.e4m3 (the first restarts the
//                tensor-core accumulator), waits, releases the stage, and
//                promotes: final += acc * (a_scale(row) * b_scale(col block)) in
//                float32 registers (the scale of B is chosen per 8 columns, so
//                block_n = 112/144/160 tiles that straddle two 128-row weight
//                scale blocks are exact).
//   producer W   one thread issues TMA loads of A [block_m, 128], B [block_n, 128]
//                (128-byte swizzle) and A's scales [block_m] per stage into a
//                kStages-deep ring; full/empty mbarriers hand stages over.
// setmaxnreg moves registers from the producer (40) to the math warpgroups (232).
// The epilogue stores rows straight from registers (bf16 pairs or float pairs),
// adding C when given; rows a tile does not compute get zeros.
//
// Written without a GPU: compiled for sm_90a, never run.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <string>

#include "common/sm90_ptx.cuh"
#include "gemm/sm90/fp8_gemm_sm90.h"
#include "gemm/sm90/tile_scheduler.cuh"

namespace jaxinfra {
namespace gemm {
namespace sm90 {
namespace {

using jaxinfra::sm90::advance_descriptor;
using jaxinfra::sm90::fence_registers;
using jaxinfra::sm90::kmajor_sw128_descriptor;
using jaxinfra::sm90::mbarrier_arrive;
using jaxinfra::sm90::mbarrier_arrive_expect_tx;
using jaxinfra::sm90::mbarrier_wait;

constexpr int kStageK = 128;          // K values (= bytes of e4m3) per stage: one scale block
constexpr int kWgmmaK = 32;           // K of one fp8 wgmma
constexpr int kWarpgroupRows = 64;    // rows of one wgmma (and of one math warpgroup)
constexpr int kMaxStages = 8;
constexpr int kSmemBudget = 232448;   // dynamic shared memory per CTA on H100/H200
constexpr int kProducerRegisters = 40;
constexpr int kMathRegisters = 232;

// Shared-memory plan of one (block_m, block_n) instantiation.
template <int kBlockM, int kBlockN, bool kBPerToken>
struct TileShape {
  static constexpr int kMathWarpgroups = kBlockM / kWarpgroupRows;
  static constexpr int kThreads = (kMathWarpgroups + 1) * 128;
  static constexpr int kABytes = kBlockM * kStageK;
  static constexpr int kBBytes = kBlockN * kStageK;
  static constexpr int kSfaBytes = kBlockM * 4;
  static constexpr int kSfbBytes = kBPerToken ? kBlockN * 4 : 0;  // per-token B scales
  static constexpr int kStageBytes = kABytes + kBBytes + kSfaBytes + kSfbBytes;
  static constexpr int kFixedBytes =
      1024 /* alignment slack */ + 2 * 8 * kMaxStages + 2 * 4 * kMaxContiguousEndsGroups;
  static constexpr int kFitStages = (kSmemBudget - kFixedBytes) / kStageBytes;
  static constexpr int kStages = kFitStages < kMaxStages ? kFitStages : kMaxStages;
  static constexpr int kSmemBytes = kFixedBytes + kStages * kStageBytes;
  static constexpr int kAccumulators = kBlockN / 2;  // floats per thread of one wgmma
  static_assert(kStages >= 3, "tile too large for a 3-stage pipeline");
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "128B-swizzle atoms need 1 KiB");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "block_n must be a multiple of 16");
};

// The CuTe atom of wgmma.m64n{N}k32.f32.e4m3.e4m3 with both operands in shared memory.
template <int kN> struct Fp8Wgmma;
#define JAXINFRA_FP8_WGMMA(N) \
  template <> struct Fp8Wgmma<N> { using Atom = cute::SM90::GMMA::MMA_64x##N##x32_F32E4M3E4M3_SS_TN<>; };
JAXINFRA_FP8_WGMMA(64)
JAXINFRA_FP8_WGMMA(96)
JAXINFRA_FP8_WGMMA(112)
JAXINFRA_FP8_WGMMA(128)
JAXINFRA_FP8_WGMMA(144)
JAXINFRA_FP8_WGMMA(160)
#undef JAXINFRA_FP8_WGMMA

struct KernelParams {
  SchedulerParams sched;
  int64_t tiles;
  int64_t k;                  // K (columns of A and B)
  int sfb_n_blocks;           // ceil(n / 128)
  const float* sfb;           // [problems, groups, sfb_n_blocks, k_blocks]
  const float* c;             // optional [problems * m, n] float32
  void* d;                    // [problems * m, n]
  OutType out;
};

// Shared memory carved out of the dynamic allocation (1 KiB aligned).
template <int kBlockM, int kBlockN, bool kBPerToken>
struct SmemPlan {
  using Shape = TileShape<kBlockM, kBlockN, kBPerToken>;
  uint8_t* base;
  __device__ explicit SmemPlan(uint8_t* raw)
      : base(reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023})) {}
  __device__ uint8_t* a(int s) const { return base + s * Shape::kABytes; }
  __device__ uint8_t* b(int s) const {
    return base + Shape::kStages * Shape::kABytes + s * Shape::kBBytes;
  }
  __device__ float* sfa(int s) const {
    return reinterpret_cast<float*>(base + Shape::kStages * (Shape::kABytes + Shape::kBBytes) +
                                    s * Shape::kSfaBytes);
  }
  __device__ float* sfb(int s) const {
    return reinterpret_cast<float*>(base + Shape::kStages * (Shape::kABytes + Shape::kBBytes +
                                                             Shape::kSfaBytes) +
                                    s * Shape::kSfbBytes);
  }
  __device__ uint64_t* full(int s) const {
    return reinterpret_cast<uint64_t*>(base + Shape::kStages * Shape::kStageBytes) + s;
  }
  __device__ uint64_t* empty(int s) const { return full(Shape::kStages) + s; }
  __device__ int32_t* ends() const { return reinterpret_cast<int32_t*>(empty(Shape::kStages)); }
};

// --- producer ------------------------------------------------------------------------------------

template <int kBlockM, int kBlockN, bool kBPerToken>
__device__ __forceinline__ void produce(const SmemPlan<kBlockM, kBlockN, kBPerToken>& smem,
                                        const CUtensorMap* map_a, const CUtensorMap* map_b,
                                        const CUtensorMap* map_sfa, const CUtensorMap* map_sfb,
                                        const KernelParams& p) {
  using Shape = TileShape<kBlockM, kBlockN, kBPerToken>;
  const bool leader = threadIdx.x % 32 == 0;
  if (leader) {
    jaxinfra::sm90::tma_prefetch_descriptor(map_a);
    jaxinfra::sm90::tma_prefetch_descriptor(map_b);
    jaxinfra::sm90::tma_prefetch_descriptor(map_sfa);
    if (kBPerToken) jaxinfra::sm90::tma_prefetch_descriptor(map_sfb);
  }
  uint32_t iteration = 0;
  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const Tile tile = resolve_tile<kBlockM, kBlockN>(p.sched, smem.ends(), t);
    if (!tile.compute) continue;
    // Scale rows: per problem in the batched layouts; one shared matrix for kKGrouped.
    const int scale_row0 =
        p.sched.layout == RowLayout::kKGrouped ? 0 : tile.problem * p.sched.k_blocks;
    for (int kb = tile.kb0; kb < tile.kb0 + tile.k_blocks; ++kb, ++iteration) {
      const int s = iteration % Shape::kStages;
      const uint32_t phase = (iteration / Shape::kStages) & 1;
      if (leader) {
        mbarrier_wait(smem.empty(s), phase ^ 1);
        mbarrier_arrive_expect_tx(smem.full(s), Shape::kStageBytes);
        jaxinfra::sm90::tma_load_2d(map_a, smem.full(s), smem.a(s), kb * kStageK,
                                    static_cast<int32_t>(tile.a_row0));
        jaxinfra::sm90::tma_load_2d(map_b, smem.full(s), smem.b(s), kb * kStageK,
                                    static_cast<int32_t>(tile.b_row0));
        jaxinfra::sm90::tma_load_2d(map_sfa, smem.full(s), smem.sfa(s), tile.m_block * kBlockM,
                                    scale_row0 + kb);
        if (kBPerToken) {
          jaxinfra::sm90::tma_load_2d(map_sfb, smem.full(s), smem.sfb(s),
                                      tile.n_block * kBlockN, scale_row0 + kb);
        }
      }
      __syncwarp();
    }
  }
}

// --- math warpgroups -----------------------------------------------------------------------------

// Where this thread's accumulators live in the tile: rows r and r + 8 of its
// warpgroup's 64 rows, columns 8j + 2 (lane % 4) + {0, 1} of chunk j
// (wgmma's m64nNk32 f32 accumulator layout).
struct Fragment {
  int row0;  // tile row of accumulators 4j + {0, 1}; row0 + 8 holds 4j + {2, 3}
  int col;   // tile column of accumulator 4j (+ 8j)
  __device__ Fragment() {
    const int warp_in_warpgroup = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    row0 = jaxinfra::sm90::warpgroup_index() * kWarpgroupRows + warp_in_warpgroup * 16 + lane / 4;
    col = (lane % 4) * 2;
  }
};

template <int kBlockM, int kBlockN, bool kBPerToken>
__device__ __forceinline__ void mainloop(const SmemPlan<kBlockM, kBlockN, kBPerToken>& smem,
                                         const KernelParams& p, const Tile& tile,
                                         const Fragment& frag, uint32_t* iteration,
                                         float (&result)[TileShape<kBlockM, kBlockN, kBPerToken>::kAccumulators]) {
  using Shape = TileShape<kBlockM, kBlockN, kBPerToken>;
  using Atom = typename Fp8Wgmma<kBlockN>::Atom;
  const int lane = threadIdx.x % 32;
  constexpr int kN = Shape::kAccumulators;
  // B scale blocks the tile touches: columns < boundary use the first.
  const int n0 = tile.n_block * kBlockN;
  const int scale_block = n0 / 128;
  const int boundary = (scale_block + 1) * 128 - n0;
  const bool second = boundary < kBlockN && scale_block + 1 < p.sfb_n_blocks;
  const float* sfb = p.sfb + ((static_cast<int64_t>(tile.problem) * p.sched.groups + tile.group) *
                                  p.sfb_n_blocks + scale_block) * p.sched.k_blocks;
  const int wg_row_offset = jaxinfra::sm90::warpgroup_index() * kWarpgroupRows * kStageK;
  float acc[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) acc[i] = 0.0f;
  for (int kb = tile.kb0; kb < tile.kb0 + tile.k_blocks; ++kb, ++*iteration) {
    const int s = *iteration % Shape::kStages;
    const uint32_t phase = (*iteration / Shape::kStages) & 1;
    const float sb0 = kBPerToken ? 0.0f : __ldg(sfb + kb);
    const float sb1 = !kBPerToken && second ? __ldg(sfb + p.sched.k_blocks + kb) : 0.0f;
    mbarrier_wait(smem.full(s), phase);
    const uint64_t desc_a = kmajor_sw128_descriptor(smem.a(s) + wg_row_offset);
    const uint64_t desc_b = kmajor_sw128_descriptor(smem.b(s));
    fence_registers(acc);
    jaxinfra::sm90::wgmma_fence_operands();
#pragma unroll
    for (int step = 0; step < kStageK / kWgmmaK; ++step) {
      jaxinfra::sm90::wgmma_ss<Atom>(advance_descriptor(desc_a, step * kWgmmaK),
                                     advance_descriptor(desc_b, step * kWgmmaK), acc, step > 0);
    }
    jaxinfra::sm90::wgmma_commit();
    fence_registers(acc);
    jaxinfra::sm90::wgmma_wait<0>();
    fence_registers(acc);
    const float sa0 = smem.sfa(s)[frag.row0];
    const float sa1 = smem.sfa(s)[frag.row0 + 8];
    if constexpr (kBPerToken) {
      // One scale per column (read from the stage before releasing it).
#pragma unroll
      for (int j = 0; j < kN / 4; ++j) {
        const float2 sb = *reinterpret_cast<const float2*>(smem.sfb(s) + 8 * j + frag.col);
        result[4 * j + 0] += acc[4 * j + 0] * (sa0 * sb.x);
        result[4 * j + 1] += acc[4 * j + 1] * (sa0 * sb.y);
        result[4 * j + 2] += acc[4 * j + 2] * (sa1 * sb.x);
        result[4 * j + 3] += acc[4 * j + 3] * (sa1 * sb.y);
      }
      __syncwarp();
      if (lane == 0) mbarrier_arrive(smem.empty(s));
      continue;
    }
    __syncwarp();
    if (lane == 0) mbarrier_arrive(smem.empty(s));  // the next TMA overlaps the promotion
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) {
      const float sb = j * 8 < boundary ? sb0 : sb1;
      const float s0 = sa0 * sb, s1 = sa1 * sb;
      result[4 * j + 0] += acc[4 * j + 0] * s0;
      result[4 * j + 1] += acc[4 * j + 1] * s0;
      result[4 * j + 2] += acc[4 * j + 2] * s1;
      result[4 * j + 3] += acc[4 * j + 3] * s1;
    }
  }
}

__device__ __forceinline__ void store_pair(const KernelParams& p, int64_t index, bool pair,
                                           float v0, float v1) {
  if (p.out == OutType::kFloat32) {
    float* d = static_cast<float*>(p.d) + index;
    if (p.c != nullptr) {
      v0 += p.c[index];
      if (pair) v1 += p.c[index + 1];
    }
    if (pair) {
      *reinterpret_cast<float2*>(d) = make_float2(v0, v1);
    } else {
      d[0] = v0;
    }
  } else {
    __nv_bfloat16* d = static_cast<__nv_bfloat16*>(p.d) + index;
    if (pair) {
      *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(v0, v1);
    } else {
      d[0] = __float2bfloat16_rn(v0);
    }
  }
}

// Writes this thread's two rows of the tile: computed rows get `result`,
// rows the layout leaves out get zeros, rows of another group are skipped
// (the fix-up kernel writes them).
template <int kBlockM, int kBlockN, bool kBPerToken>
__device__ __forceinline__ void epilogue(const SmemPlan<kBlockM, kBlockN, kBPerToken>& smem,
                                         const KernelParams& p, const Tile& tile,
                                         const Fragment& frag,
                                         const float (&result)[TileShape<kBlockM, kBlockN, kBPerToken>::kAccumulators]) {
  constexpr int kN = TileShape<kBlockM, kBlockN, kBPerToken>::kAccumulators;
  const int n = p.sched.n;
  const bool even_n = n % 2 == 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = frag.row0 + 8 * half;
    if (row >= tile.rows) continue;
    bool computed = tile.compute && row < tile.valid_rows;
    if (p.sched.layout == RowLayout::kContiguousIndices ||
        p.sched.layout == RowLayout::kContiguousEnds) {
      const int g = row_group(p.sched, smem.ends(), tile.problem, tile.m_block * kBlockM + row);
      if (g >= 0 && g != tile.group) continue;
      computed = computed && g >= 0;
    }
    const int64_t row_index = tile.row0 + row;
    const float fill = tile.valid ? 0.0f : __int_as_float(0x7fffffff);  // NaN: invalid K group
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) {
      const int col = tile.n_block * kBlockN + 8 * j + frag.col;
      if (col >= n) continue;
      const float v0 = computed ? result[4 * j + 2 * half] : fill;
      const float v1 = computed ? result[4 * j + 2 * half + 1] : fill;
      const bool pair = even_n && col + 1 < n;
      store_pair(p, row_index * n + col, pair, v0, v1);
      if (!pair && col + 1 < n) store_pair(p, row_index * n + col + 1, false, v1, 0.0f);
    }
  }
}

template <int kBlockM, int kBlockN, bool kBPerToken>
__global__ void __launch_bounds__(TileShape<kBlockM, kBlockN, kBPerToken>::kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                    const __grid_constant__ CUtensorMap map_b,
                    const __grid_constant__ CUtensorMap map_sfa,
                    const __grid_constant__ CUtensorMap map_sfb,
                    const int32_t* __restrict__ raw_ends, const __grid_constant__ KernelParams p) {
  using Shape = TileShape<kBlockM, kBlockN, kBPerToken>;
  extern __shared__ uint8_t smem_raw[];
  const SmemPlan<kBlockM, kBlockN, kBPerToken> smem(smem_raw);
  if (threadIdx.x == 0) {
    for (int s = 0; s < Shape::kStages; ++s) {
      jaxinfra::sm90::mbarrier_init(smem.full(s), 1);
      jaxinfra::sm90::mbarrier_init(smem.empty(s), 4 * Shape::kMathWarpgroups);
    }
    jaxinfra::sm90::fence_barrier_init();
  }
  if (p.sched.layout == RowLayout::kContiguousEnds) {
    prefix_max_ends(raw_ends, p.sched.groups, p.sched.m, smem.ends());  // syncs
  } else if (p.sched.layout == RowLayout::kKGrouped) {
    prefix_k_groups(raw_ends, p.sched.groups, p.k, smem.ends(),
                    smem.ends() + p.sched.groups);  // syncs
  } else {
    __syncthreads();
  }

  if (jaxinfra::sm90::warpgroup_index() == Shape::kMathWarpgroups) {
    jaxinfra::sm90::set_registers_dealloc<kProducerRegisters>();
    if (threadIdx.x % 128 < 32) produce(smem, &map_a, &map_b, &map_sfa, &map_sfb, p);
  } else {
    jaxinfra::sm90::set_registers_alloc<kMathRegisters>();
    const Fragment frag;
    uint32_t iteration = 0;
    for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
      const Tile tile = resolve_tile<kBlockM, kBlockN>(p.sched, smem.ends(), t);
      float result[Shape::kAccumulators];
#pragma unroll
      for (int i = 0; i < Shape::kAccumulators; ++i) result[i] = 0.0f;
      if (tile.compute) mainloop(smem, p, tile, frag, &iteration, result);
      epilogue(smem, p, tile, frag, result);
    }
  }
}

// --- fix-up of rows whose group differs from their block's ------------------------------------

// One CTA per (problem, block_m rows): rows of a contiguous layout whose group
// is not their tile's group (mis-aligned groups) get the exact arithmetic of
// gemm.h on CUDA cores. With DeepGEMM-aligned layouts every CTA finds nothing
// to do after one ballot per 32 rows.
constexpr int kFixupThreads = 128;

__global__ void __launch_bounds__(kFixupThreads)
    fixup_kernel(const uint8_t* __restrict__ a, const float* __restrict__ sfa,
                 const uint8_t* __restrict__ b, const int32_t* __restrict__ raw_ends,
                 int64_t k, int block_m, int sfa_stride, const KernelParams p) {
  __shared__ int32_t ends[kMaxContiguousEndsGroups];
  __shared__ int tile_group;
  const int problem = blockIdx.x / p.sched.m_blocks;
  const int m_block = blockIdx.x % p.sched.m_blocks;
  const int row_begin = m_block * block_m;
  const int rows = min(block_m, p.sched.m - row_begin);
  if (p.sched.layout == RowLayout::kContiguousEnds) {
    prefix_max_ends(raw_ends + static_cast<int64_t>(problem) * p.sched.groups, p.sched.groups,
                    p.sched.m, ends);
  }
  if (threadIdx.x < 32) {
    const int g = block_group(p.sched, ends, problem, row_begin, rows);
    if (threadIdx.x == 0) tile_group = g;
  }
  __syncthreads();
  const int n = p.sched.n;
  for (int row = 0; row < rows; ++row) {
    const int g = row_group(p.sched, ends, problem, row_begin + row);
    if (g < 0 || g == tile_group) continue;
    const int64_t a_row = static_cast<int64_t>(problem) * p.sched.m + row_begin + row;
    const int64_t b_group = static_cast<int64_t>(problem) * p.sched.groups + g;
    for (int col = threadIdx.x; col < n; col += blockDim.x) {
      const uint8_t* a_ptr = a + a_row * k;
      const uint8_t* b_ptr = b + (b_group * n + col) * k;
      float total = 0.0f;
      for (int kb = 0; kb < p.sched.k_blocks; ++kb) {
        float block_sum = 0.0f;
        const int64_t k_end = min(k, static_cast<int64_t>(kb + 1) * kStageK);
        for (int64_t kk = static_cast<int64_t>(kb) * kStageK; kk < k_end; ++kk) {
          __nv_fp8_e4m3 x, y;
          x.__x = a_ptr[kk];
          y.__x = b_ptr[kk];
          block_sum += static_cast<float>(x) * static_cast<float>(y);
        }
        const float sa = sfa[(static_cast<int64_t>(problem) * p.sched.k_blocks + kb) * sfa_stride +
                             row_begin + row];
        const float sb = p.sfb[(b_group * p.sfb_n_blocks + col / 128) * p.sched.k_blocks + kb];
        total += block_sum * (sa * sb);
      }
      store_pair(p, a_row * n + col, false, total, 0.0f);
    }
  }
}

// --- host ---------------------------------------------------------------------------------------

std::string encode(CUtensorMap* map, CUtensorMapDataType type, const void* base, uint64_t inner,
                   uint64_t outer, uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer,
                   CUtensorMapSwizzle swizzle) {
  const uint64_t dims[2] = {inner, outer};
  const uint64_t strides[1] = {row_bytes};
  const uint32_t box[2] = {box_inner, box_outer};
  const char* error =
      jaxinfra::sm90::encode_tensor_map(map, type, 2, base, dims, strides, box, swizzle);
  return error ? std::string(error) : std::string();
}

template <int kBlockM, int kBlockN, bool kBPerToken>
std::string launch(const Fp8GemmArgs& args, const BlockConfig& config, cudaStream_t stream) {
  using Shape = TileShape<kBlockM, kBlockN, kBPerToken>;
  const bool k_grouped = args.layout == RowLayout::kKGrouped;
  // kKGrouped: the tile space has one problem per K group over shared A and B.
  const int64_t problems = k_grouped ? args.groups : args.batch;
  const int64_t matrices = k_grouped ? 1 : args.batch;
  const int64_t k_blocks = ceil_div(args.k, kStageK);
  const int64_t sfa_stride = align_up(args.m, kScaleAlign);
  const int64_t sfb_stride = align_up(args.n, kScaleAlign);
  CUtensorMap map_a, map_b, map_sfa, map_sfb{};
  std::string error = encode(&map_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, args.a, args.k,
                             matrices * args.m, args.k, kStageK, kBlockM,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  if (error.empty()) {
    error = encode(&map_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, args.b, args.k,
                   matrices * (k_grouped ? 1 : args.groups) * args.n, args.k, kStageK, kBlockN,
                   CU_TENSOR_MAP_SWIZZLE_128B);
  }
  if (error.empty()) {
    error = encode(&map_sfa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, args.sfa, sfa_stride,
                   matrices * k_blocks, sfa_stride * 4, kBlockM, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (error.empty() && kBPerToken) {
    error = encode(&map_sfb, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, args.sfb, sfb_stride,
                   matrices * k_blocks, sfb_stride * 4, kBlockN, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (!error.empty()) return error;

  KernelParams p;
  p.sched.layout = args.layout;
  p.sched.problems = static_cast<int>(problems);
  p.sched.m = static_cast<int>(args.m);
  p.sched.n = static_cast<int>(args.n);
  p.sched.groups = static_cast<int>(args.groups);
  p.sched.alignment = static_cast<int>(args.alignment);
  p.sched.m_blocks = static_cast<int>(ceil_div(args.m, kBlockM));
  p.sched.n_blocks = static_cast<int>(ceil_div(args.n, kBlockN));
  p.sched.row_layout = args.row_layout;
  p.sched.k_blocks = static_cast<int>(k_blocks);
  p.tiles = problems * p.sched.m_blocks * p.sched.n_blocks;
  p.k = args.k;
  p.sfb_n_blocks = static_cast<int>(ceil_div(args.n, 128));
  p.sfb = args.sfb;
  p.c = args.c;
  p.d = args.d;
  p.out = args.out;

  auto* kernel = &fp8_gemm_kernel<kBlockM, kBlockN, kBPerToken>;
  // A function attribute, not a stream operation: allowed while a graph is captured.
  cudaError_t status = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  const int ctas = static_cast<int>(p.tiles < config.ctas ? (p.tiles > 0 ? p.tiles : 1) : config.ctas);
  const bool ends = args.layout == RowLayout::kContiguousEnds;
  kernel<<<ctas, Shape::kThreads, Shape::kSmemBytes, stream>>>(
      map_a, map_b, map_sfa, map_sfb, ends || k_grouped ? args.row_layout : nullptr, p);
  status = cudaGetLastError();
  if (status != cudaSuccess) return cudaGetErrorString(status);
  if (args.layout == RowLayout::kContiguousIndices || ends) {
    fixup_kernel<<<static_cast<unsigned>(problems * p.sched.m_blocks), kFixupThreads, 0, stream>>>(
        args.a, args.sfa, args.b, ends ? args.row_layout : nullptr, args.k, kBlockM,
        static_cast<int>(sfa_stride), p);
    status = cudaGetLastError();
    if (status != cudaSuccess) return cudaGetErrorString(status);
  }
  return std::string();
}

template <int kBlockM, bool kBPerToken>
std::string launch_block_n(const Fp8GemmArgs& args, const BlockConfig& config,
                           cudaStream_t stream) {
  switch (config.block_n) {
    case 64: return launch<kBlockM, 64, kBPerToken>(args, config, stream);
    case 96: return launch<kBlockM, 96, kBPerToken>(args, config, stream);
    case 112: return launch<kBlockM, 112, kBPerToken>(args, config, stream);
    case 128: return launch<kBlockM, 128, kBPerToken>(args, config, stream);
    case 144: return launch<kBlockM, 144, kBPerToken>(args, config, stream);
    case 160: return launch<kBlockM, 160, kBPerToken>(args, config, stream);
    default: return "fp8_gemm_sm90: no kernel for block_n " + std::to_string(config.block_n);
  }
}

// One launch per vmap problem, for the layouts whose layout table lives in
// shared memory (group ends, K groups).
std::string launch_per_problem(const Fp8GemmArgs& args, int num_sms, cudaStream_t stream) {
  const int64_t k_blocks = ceil_div(args.k, kStageK);
  const int64_t out_bytes = args.out == OutType::kFloat32 ? 4 : 2;
  const bool k_grouped = args.layout == RowLayout::kKGrouped;
  for (int64_t i = 0; i < args.batch; ++i) {
    Fp8GemmArgs one = args;
    one.batch = 1;
    one.a += i * args.m * args.k;
    one.sfa += i * k_blocks * align_up(args.m, kScaleAlign);
    one.row_layout += i * args.groups;
    if (k_grouped) {
      one.b += i * args.n * args.k;
      one.sfb += i * k_blocks * align_up(args.n, kScaleAlign);
      if (one.c != nullptr) one.c += i * args.groups * args.m * args.n;
      one.d = static_cast<uint8_t*>(args.d) + i * args.groups * args.m * args.n * out_bytes;
    } else {
      one.b += i * args.groups * args.n * args.k;
      one.sfb += i * args.groups * ceil_div(args.n, 128) * k_blocks;
      one.d = static_cast<uint8_t*>(args.d) + i * args.m * args.n * out_bytes;
    }
    if (std::string error = fp8_gemm_sm90(one, num_sms, stream); !error.empty()) return error;
  }
  return std::string();
}

}  // namespace

std::string unsupported(const Fp8GemmArgs& args) {
  if (args.k % 16 != 0) return "k must be a multiple of 16 (TMA row stride; jaxinfra.gemm pads it)";
  if (args.m < 1 || args.n < 1) return "m and n must be >= 1";
  const int64_t kMaxRows = INT32_MAX;
  if (args.batch * args.m > kMaxRows || args.batch * args.groups * args.n > kMaxRows ||
      args.batch * ceil_div(args.k, kStageK) > kMaxRows) {
    return "too many rows for 32-bit TMA coordinates";
  }
  const bool k_grouped = args.layout == RowLayout::kKGrouped;
  if ((args.layout == RowLayout::kContiguousEnds || k_grouped) &&
      args.groups > kMaxContiguousEndsGroups) {
    return "at most " + std::to_string(kMaxContiguousEndsGroups) + " groups in this layout";
  }
  if (k_grouped && !args.b_per_token) return "k-grouped GEMMs take per-token B scales";
  if (args.b_per_token && !k_grouped && args.layout != RowLayout::kDense) {
    return "per-token B scales are supported by the dense and k-grouped GEMMs only";
  }
  if (k_grouped && args.out != OutType::kFloat32) return "k-grouped GEMMs write float32";
  if (args.alignment < 1 || args.alignment > INT32_MAX) return "alignment must be in [1, 2^31)";
  for (const void* ptr : {static_cast<const void*>(args.a), static_cast<const void*>(args.b),
                          static_cast<const void*>(args.sfa), static_cast<const void*>(args.sfb)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return "operands must be 16-byte aligned";
  }
  if (args.c != nullptr && args.out != OutType::kFloat32) return "c needs a float32 output";
  return std::string();
}

std::string fp8_gemm_sm90(const Fp8GemmArgs& args, int num_sms, cudaStream_t stream) {
  if (std::string why = unsupported(args); !why.empty()) return why;
  const bool k_grouped = args.layout == RowLayout::kKGrouped;
  if ((args.layout == RowLayout::kContiguousEnds || k_grouped) && args.batch > 1) {
    return launch_per_problem(args, num_sms, stream);
  }
  const int64_t problems = k_grouped ? args.groups : args.batch;
  const BlockConfig config = choose_block_config(args.layout, problems, args.m, args.n, num_sms);
  if (args.b_per_token) {
    return config.block_m == 64 ? launch_block_n<64, true>(args, config, stream)
                                : launch_block_n<128, true>(args, config, stream);
  }
  return config.block_m == 64 ? launch_block_n<64, false>(args, config, stream)
                              : launch_block_n<128, false>(args, config, stream);
}

}  // namespace sm90
}  // namespace gemm
}  // namespace jaxinfra
