// Hopper MLA decode (FlashMLA-style) over the paged latent cache: bf16 pages
// of 64 tokens (TMA), or DeepSeek-V3.2's FP8 656-byte records (any page size,
// dequantized to bf16 in shared memory by all threads; load_tile_fp8).
//
// Grid: (num_sm_parts, ceil(rows / 64), h_kv); a CTA of two warpgroups owns
// 64 query rows (FlashMLA's q_seq_per_hk order, mla.h) of one KV head and walks
// the requests and 64-key tiles its schedule row (tile_metadata) assigns it.
// Per tile (64 keys x 576 channels, 72 KiB; for the bf16 cache one page):
//   * one thread of warpgroup 1 issues 9 TMA loads (one per 64-channel,
//     128-byte-swizzled chunk) of the *next* tile into the other of two
//     buffers, completing on that buffer's mbarrier (double buffering);
//   * a partial last tile has its rows past seqlen zeroed in shared memory
//     (NaN-poisoned slots must not reach P.V: 0 * NaN = NaN);
//   * warpgroup 0: S = Q K^T (36 wgmma.m64n64k16, Q resident in shared
//     memory), masking, online softmax in base 2, P (bf16) to shared memory
//     and the rescale factor of each row;
//   * both warpgroups: O[:, 256w : 256w + 256] = alpha * O + P V (4
//     wgmma.m64n256k16, V read MN-major straight from the K tile).
// A request with one split writes out (bf16) and lse (natural log); split k of
// a split request writes its normalized output and lse to workspace slot
// num_splits[r] + k, and the combine kernel merges the slots.
//
// Written without a GPU: compiled for sm_90a, never run.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <string>

#include "common/sm90_ptx.cuh"
#include "mla/sm90/mla_decode_sm90.h"

namespace jaxinfra {
namespace mla {
namespace sm90 {
namespace {

namespace ptx = ::jaxinfra::sm90;
using cute::SM90::GMMA::Major;

constexpr int kRows = 64;             // query rows per CTA (one wgmma M)
constexpr int kKeys = 64;             // keys per tile (= page size)
constexpr int kChunk = 64;            // bf16 channels per 128-byte swizzled chunk
constexpr int kQkChunks = kQkDim / kChunk;   // 9
constexpr int kChunkBytes = kRows * 128;     // 64 rows x 128 bytes = 8 KiB
constexpr int kTileBytes = kQkChunks * kChunkBytes;  // 72 KiB (Q tile and K tile)
constexpr int kVHalf = 256;           // V channels per warpgroup
constexpr int kThreads = 256;
constexpr int kSmemBytes = 1024 /* alignment slack */ + 3 * kTileBytes + kChunkBytes /* P */ +
                           3 * kRows * 4 /* alpha, m, l */ + 2 * 8 /* barriers */;
static_assert(kSmemBytes <= 232448, "MLA decode shared memory plan exceeds 227 KiB");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using ScoreWgmma = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>;
using ValueWgmma = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<Major::K, Major::MN>;

struct Params {
  int batch, s_q, h_q, h_kv, heads_per_kv, rows, max_blocks, num_blocks, parts;
  int page_size;     // 64 for the bf16 cache; any for the FP8 cache
  const uint8_t* kv;  // the FP8 cache's 656-byte records (the bf16 cache goes through TMA)
  float scale_log2;  // softmax_scale * log2(e)
  bool causal;
  const __nv_bfloat16* q;
  const int32_t* block_table;
  const int32_t* seqlens;
  const int32_t* metadata;
  const int32_t* num_splits;
  __nv_bfloat16* out;
  float* lse;
  float* o_accum;
  float* lse_accum;
};

struct Smem {
  uint8_t* base;
  __device__ explicit Smem(uint8_t* raw)
      : base(reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023})) {}
  __device__ uint8_t* q() const { return base; }
  __device__ uint8_t* kv(int buffer) const { return base + (1 + buffer) * kTileBytes; }
  __device__ uint8_t* p() const { return base + 3 * kTileBytes; }
  __device__ float* alpha() const { return reinterpret_cast<float*>(p() + kChunkBytes); }
  __device__ float* row_max() const { return alpha() + kRows; }
  __device__ float* row_sum() const { return row_max() + kRows; }
  __device__ uint64_t* full(int buffer) const {
    return reinterpret_cast<uint64_t*>(row_sum() + kRows) + buffer;
  }
};

// Byte offset of 16-byte unit `unit` (0..7) of row `row` inside a 128-byte-swizzled chunk.
__device__ __forceinline__ int swizzled(int row, int unit) {
  return row * 128 + ((unit ^ (row % 8)) * 16);
}

// MN-major, 128-byte-swizzled operand (V as wgmma's B): 64-channel chunks
// kChunkBytes apart (LBO), 8-key groups 1024 bytes apart (SBO).
__device__ __forceinline__ uint64_t mn_major_sw128_descriptor(const void* smem) {
  cute::GmmaDescriptor desc;
  desc.bitfield.start_address_ = static_cast<uint16_t>(ptx::smem_address(smem) >> 4);
  desc.bitfield.leading_byte_offset_ = kChunkBytes >> 4;
  desc.bitfield.stride_byte_offset_ = 1024 >> 4;
  desc.bitfield.base_offset_ = 0;
  desc.bitfield.layout_type_ = 1;  // SWIZZLE_128B
  return desc.desc_;
}

// Query rows of (request, m block, kv head) into the swizzled Q tile; rows
// past `rows` are zero.
__device__ void load_q(const Params& p, const Smem& smem, int req, int m_block, int g) {
  constexpr int kUnitsPerRow = kQkDim / 8;
  for (int i = threadIdx.x; i < kRows * kUnitsPerRow; i += kThreads) {
    const int r = i / kUnitsPerRow, unit = i % kUnitsPerRow;
    const int row = m_block * kRows + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < p.rows) {
      const int s = row / p.heads_per_kv, head = g * p.heads_per_kv + row % p.heads_per_kv;
      const int64_t base = ((static_cast<int64_t>(req) * p.s_q + s) * p.h_q + head) * kQkDim;
      v = *reinterpret_cast<const uint4*>(p.q + base + unit * 8);
    }
    *reinterpret_cast<uint4*>(smem.q() + (unit / 8) * kChunkBytes + swizzled(r, unit % 8)) = v;
  }
  ptx::fence_proxy_async_shared();
}

__device__ __forceinline__ void load_tile(const CUtensorMap* map, const Smem& smem, int buffer,
                                          int page, int g) {
  ptx::mbarrier_arrive_expect_tx(smem.full(buffer), kTileBytes);
  for (int c = 0; c < kQkChunks; ++c) {
    ptx::tma_load_3d(map, smem.full(buffer), smem.kv(buffer) + c * kChunkBytes, c * kChunk, g,
                     page * kKeys);
  }
}

__device__ __forceinline__ int page_of(const Params& p, int req, int tile) {
  const int page = __ldg(p.block_table + static_cast<int64_t>(req) * p.max_blocks + tile);
  return min(max(page, 0), p.num_blocks - 1);  // sanitized by mla_decode; clamped for safety
}

// Keys of row `row` that are visible (bottom-right causal for s_q > 1).
__device__ __forceinline__ int visible_keys(const Params& p, int seqlen, int row) {
  if (!p.causal) return seqlen;
  return seqlen - (p.s_q - 1 - row / p.heads_per_kv);
}

// Warpgroup 0: S = Q K^T for the tile, online softmax of its two rows, P and
// alpha to shared memory. m and l are this thread's running row max / sum.
__device__ __forceinline__ void scores_and_softmax(const Params& p, const Smem& smem, int buffer,
                                                   int seqlen, int tile, int m_block,
                                                   float (&m)[2], float (&l)[2],
                                                   float (&alpha)[2]) {
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.0f;
  ptx::fence_registers(s);
  ptx::wgmma_fence_operands();
#pragma unroll
  for (int c = 0; c < kQkChunks; ++c) {
    const uint64_t dq = ptx::kmajor_sw128_descriptor(smem.q() + c * kChunkBytes);
    const uint64_t dk = ptx::kmajor_sw128_descriptor(smem.kv(buffer) + c * kChunkBytes);
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      ptx::wgmma_ss<ScoreWgmma>(ptx::advance_descriptor(dq, step * 32),
                                ptx::advance_descriptor(dk, step * 32), s, c + step > 0);
    }
  }
  ptx::wgmma_commit();
  ptx::fence_registers(s);
  ptx::wgmma_wait<0>();
  ptx::fence_registers(s);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int key0 = 2 * (lane % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = warp * 16 + lane / 4 + 8 * half;
    const int visible = visible_keys(p, seqlen, m_block * kRows + row) - tile * kKeys;
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = s[4 * j + 2 * half + e];
        v = (8 * j + key0 + e) < visible ? v * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, v);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[half], mx);
    alpha[half] = m_new == -INFINITY ? 1.0f : exp2f(m[half] - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float pr[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float v = s[4 * j + 2 * half + e];
        pr[e] = v == -INFINITY ? 0.0f : exp2f(v - m_new);
        sum += pr[e];
      }
      const __nv_bfloat162 packed = __floats2bfloat162_rn(pr[0], pr[1]);
      *reinterpret_cast<__nv_bfloat162*>(smem.p() + swizzled(row, j) + 2 * key0) = packed;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    l[half] = l[half] * alpha[half] + sum;
    m[half] = m_new;
    if (lane % 4 == 0) smem.alpha()[row] = alpha[half];
  }
  ptx::fence_proxy_async_shared();
}

// Both warpgroups: O = alpha * O + P V for channels [256w, 256w + 256).
__device__ __forceinline__ void accumulate_values(const Smem& smem, int buffer,
                                                  const float (&alpha)[2], float (&o)[128]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j + 0] *= alpha[0];
    o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1];
    o[4 * j + 3] *= alpha[1];
  }
  (void)lane;
  const int w = ptx::warpgroup_index();
  const uint64_t dp = ptx::kmajor_sw128_descriptor(smem.p());
  const uint64_t dv = mn_major_sw128_descriptor(smem.kv(buffer) + 4 * w * kChunkBytes);
  ptx::fence_registers(o);
  ptx::wgmma_fence_operands();
#pragma unroll
  for (int step = 0; step < kKeys / 16; ++step) {
    ptx::wgmma_ss<ValueWgmma>(ptx::advance_descriptor(dp, step * 32),
                              ptx::advance_descriptor(dv, step * 16 * 128), o, true);
  }
  ptx::wgmma_commit();
  ptx::fence_registers(o);
  ptx::wgmma_wait<0>();
  ptx::fence_registers(o);
}

// Rows past seqlen in a partial tile: zero all 576 channels (NaN must not reach P V).
__device__ __forceinline__ void zero_tail(const Smem& smem, int buffer, int valid) {
  constexpr int kUnitsPerRow = kQkDim / 8;
  const int rows = kKeys - valid;
  for (int i = threadIdx.x; i < rows * kUnitsPerRow; i += kThreads) {
    const int r = valid + i / kUnitsPerRow, unit = i % kUnitsPerRow;
    *reinterpret_cast<uint4*>(smem.kv(buffer) + (unit / 8) * kChunkBytes + r * 128 +
                              (unit % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
  ptx::fence_proxy_async_shared();
}

// FP8 cache (DeepSeek-V3.2 records: 512 e4m3 | 4 float32 power-of-two scales,
// one per 128 channels | 64 bf16 RoPE): the tile's 64 tokens, dequantized to
// bf16 (exact: e4m3 times a power of two fits bf16) into the swizzled K tile
// layout by all threads. Tokens past seqlen are zero. Synchronous (no TMA):
// a record is 656 bytes and pages may have any size.
__device__ void load_tile_fp8(const Params& p, const Smem& smem, int req, int tile, int seqlen) {
  constexpr int kUnitsPerRow = kQkDim / 8;  // 64 e4m3 units + 8 RoPE units of 8 channels
  for (int i = threadIdx.x; i < kKeys * kUnitsPerRow; i += kThreads) {
    const int r = i / kUnitsPerRow, unit = i % kUnitsPerRow;
    const int t = tile * kKeys + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t < seqlen) {
      const int page = min(max(__ldg(p.block_table + static_cast<int64_t>(req) * p.max_blocks +
                                     t / p.page_size), 0), p.num_blocks - 1);
      const uint8_t* record =
          p.kv + (static_cast<int64_t>(page) * p.page_size + t % p.page_size) * kFp8RecordBytes;
      if (unit < kVDim / 8) {
        const uint2 bytes = *reinterpret_cast<const uint2*>(record + unit * 8);
        const float scale = *reinterpret_cast<const float*>(record + kVDim + (unit / 16) * 4);
        const uint8_t* b = reinterpret_cast<const uint8_t*>(&bytes);
        __nv_bfloat162 out[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          __nv_fp8_e4m3 lo, hi;
          lo.__x = b[2 * e];
          hi.__x = b[2 * e + 1];
          out[e] = __floats2bfloat162_rn(static_cast<float>(lo) * scale,
                                         static_cast<float>(hi) * scale);
        }
        v = *reinterpret_cast<const uint4*>(out);
      } else {
        v = *reinterpret_cast<const uint4*>(record + kVDim + 16 + (unit - kVDim / 8) * 16);
      }
    }
    *reinterpret_cast<uint4*>(smem.kv(0) + (unit / 8) * kChunkBytes + swizzled(r, unit % 8)) = v;
  }
  ptx::fence_proxy_async_shared();
}

__device__ void write_split(const Params& p, const Smem& smem, int req, int m_block, int g,
                            bool direct, int slot, const float (&o)[128]) {
  const int lane = threadIdx.x % 32, warp_in_wg = (threadIdx.x / 32) % 4;
  const int w = ptx::warpgroup_index();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp_in_wg * 16 + lane / 4 + 8 * half;
    const int row = m_block * kRows + r;
    if (row >= p.rows) continue;
    const float l = smem.row_sum()[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse_value = l > 0.0f ? (smem.row_max()[r] + log2f(l)) * kLn2 : INFINITY;
    const int s = row / p.heads_per_kv, head = g * p.heads_per_kv + row % p.heads_per_kv;
    if (direct) {
      __nv_bfloat16* dst =
          p.out + ((static_cast<int64_t>(req) * p.s_q + s) * p.h_q + head) * kVDim + w * kVHalf;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int d = 8 * j + 2 * (lane % 4);
        *reinterpret_cast<__nv_bfloat162*>(dst + d) =
            __floats2bfloat162_rn(o[4 * j + 2 * half] * inv, o[4 * j + 2 * half + 1] * inv);
      }
      if (w == 0 && lane % 4 == 0) {
        p.lse[(static_cast<int64_t>(req) * p.h_q + head) * p.s_q + s] = lse_value;
      }
    } else {
      const int64_t base = (static_cast<int64_t>(slot) * p.h_kv + g) * p.rows + row;
      float* dst = p.o_accum + base * kVDim + w * kVHalf;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int d = 8 * j + 2 * (lane % 4);
        *reinterpret_cast<float2*>(dst + d) =
            make_float2(o[4 * j + 2 * half] * inv, o[4 * j + 2 * half + 1] * inv);
      }
      if (w == 0 && lane % 4 == 0) p.lse_accum[base] = l > 0.0f ? lse_value : -INFINITY;
    }
  }
}

template <bool kFp8Cache>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_kernel(const __grid_constant__ CUtensorMap kv_map, const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  const Smem smem(smem_raw);
  const int part = blockIdx.x, m_block = blockIdx.y, g = blockIdx.z;
  const int32_t* meta = p.metadata + static_cast<int64_t>(part) * kMetadataWidth;
  const int begin_req = max(__ldg(meta + 0), 0);
  const int end_req = min(__ldg(meta + 1), p.batch - 1);
  if (begin_req > end_req) return;  // idle part (uniform across the CTA)
  const int begin_tile = __ldg(meta + 2), end_tile = __ldg(meta + 3);
  const int begin_split = __ldg(meta + 4);

  const bool math0 = ptx::warpgroup_index() == 0;
  const bool loader = threadIdx.x == ptx::kWarpgroupThreads;
  if (threadIdx.x == 0) {
    ptx::mbarrier_init(smem.full(0), 1);
    ptx::mbarrier_init(smem.full(1), 1);
    ptx::fence_barrier_init();
  }
  if (!kFp8Cache && loader) ptx::tma_prefetch_descriptor(&kv_map);
  __syncthreads();

  uint32_t consumed = 0;  // tiles consumed so far; tile i lives in buffer i % 2
  for (int req = begin_req; req <= end_req; ++req) {
    // Lengths are sanitized by mla_decode; clamped here so no page index leaves the table.
    const int seqlen = min(max(__ldg(p.seqlens + req), 0), p.max_blocks * p.page_size);
    const int tiles = max(1, (seqlen + kKeys - 1) / kKeys);
    const int key_tiles = (seqlen + kKeys - 1) / kKeys;
    const int t0 = req == begin_req ? min(max(begin_tile, 0), tiles) : 0;
    const int t1 = req == end_req ? min(max(end_tile, t0), tiles) : tiles;
    const int t_end = min(t1, key_tiles);
    const int split = req == begin_req ? begin_split : 0;
    const int first_slot = __ldg(p.num_splits + req);
    const bool direct = __ldg(p.num_splits + req + 1) - first_slot <= 1;
    const int slot = min(max(first_slot + split, 0), p.batch + p.parts - 1);

    __syncthreads();  // the previous request's readers of Q are done
    load_q(p, smem, req, m_block, g);
    if (!kFp8Cache && loader && t0 < t_end) {
      load_tile(&kv_map, smem, consumed % 2, page_of(p, req, t0), g);
    }
    __syncthreads();

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2] = {1.0f, 1.0f};
    for (int tile = t0; tile < t_end; ++tile, ++consumed) {
      const int buffer = kFp8Cache ? 0 : consumed % 2;
      if constexpr (kFp8Cache) {
        load_tile_fp8(p, smem, req, tile, seqlen);
        ptx::named_barrier(1, kThreads);
      } else {
        if (loader && tile + 1 < t_end) {
          load_tile(&kv_map, smem, (consumed + 1) % 2, page_of(p, req, tile + 1), g);
        }
        ptx::mbarrier_wait(smem.full(buffer), (consumed / 2) & 1);
        const int valid = seqlen - tile * kKeys;
        if (valid < kKeys) {
          zero_tail(smem, buffer, valid);
          ptx::named_barrier(1, kThreads);
        }
      }
      if (math0) scores_and_softmax(p, smem, buffer, seqlen, tile, m_block, m, l, alpha);
      ptx::named_barrier(1, kThreads);
      if (!math0) {
        const int r = (threadIdx.x / 32) % 4 * 16 + (threadIdx.x % 32) / 4;
        alpha[0] = smem.alpha()[r];
        alpha[1] = smem.alpha()[r + 8];
      }
      accumulate_values(smem, buffer, alpha, o);
      ptx::named_barrier(1, kThreads);  // P and this buffer may be overwritten now
    }
    if (math0 && threadIdx.x % 4 == 0) {
      const int r = threadIdx.x / 32 * 16 + (threadIdx.x % 32) / 4;
      smem.row_max()[r] = m[0];
      smem.row_sum()[r] = l[0];
      smem.row_max()[r + 8] = m[1];
      smem.row_sum()[r + 8] = l[1];
    }
    __syncthreads();
    write_split(p, smem, req, m_block, g, direct, slot, o);
  }
}

// One warp per (request, kv head, row) of a request with several splits:
// lse = log sum_k exp(lse_k), out = sum_k exp(lse_k - lse) o_k.
constexpr int kCombineWarps = 8;

__global__ void __launch_bounds__(kCombineWarps * 32)
    mla_combine_kernel(const __grid_constant__ Params p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t per_req = static_cast<int64_t>(p.h_kv) * p.rows;
  if (item >= p.batch * per_req) return;
  const int req = static_cast<int>(item / per_req);
  const int g = static_cast<int>(item % per_req / p.rows);
  const int row = static_cast<int>(item % p.rows);
  const int slots = p.batch + p.parts;
  const int begin = min(max(__ldg(p.num_splits + req), 0), slots);
  const int end = min(max(__ldg(p.num_splits + req + 1), begin), slots);
  if (end - begin <= 1) return;  // written directly by the main kernel
  auto lse_of = [&](int slot) {
    return p.lse_accum[(static_cast<int64_t>(slot) * p.h_kv + g) * p.rows + row];
  };
  float mx = -INFINITY;
  for (int k = begin + lane; k < end; k += 32) mx = fmaxf(mx, lse_of(k));
  for (int offset = 16; offset > 0; offset /= 2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  }
  float sum = 0.0f;
  if (mx != -INFINITY) {
    for (int k = begin + lane; k < end; k += 32) sum += expf(lse_of(k) - mx);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float lse = mx == -INFINITY ? INFINITY : mx + logf(sum);
  float acc[16] = {};
  if (mx != -INFINITY) {
    for (int k = begin; k < end; ++k) {
      const float weight = expf(lse_of(k) - lse);
      if (weight == 0.0f) continue;
      const float* o = p.o_accum + ((static_cast<int64_t>(k) * p.h_kv + g) * p.rows + row) * kVDim;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 v = *reinterpret_cast<const float4*>(o + 128 * i + 4 * lane);
        acc[4 * i + 0] += weight * v.x;
        acc[4 * i + 1] += weight * v.y;
        acc[4 * i + 2] += weight * v.z;
        acc[4 * i + 3] += weight * v.w;
      }
    }
  }
  const int s = row / p.heads_per_kv, head = g * p.heads_per_kv + row % p.heads_per_kv;
  __nv_bfloat16* dst = p.out + ((static_cast<int64_t>(req) * p.s_q + s) * p.h_q + head) * kVDim;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162* d2 = reinterpret_cast<__nv_bfloat162*>(dst + 128 * i + 4 * lane);
    d2[0] = __floats2bfloat162_rn(acc[4 * i + 0], acc[4 * i + 1]);
    d2[1] = __floats2bfloat162_rn(acc[4 * i + 2], acc[4 * i + 3]);
  }
  if (lane == 0) p.lse[(static_cast<int64_t>(req) * p.h_q + head) * p.s_q + s] = lse;
}

}  // namespace

std::string unsupported(const DecodeProblem& problem) {
  if (problem.q_type != FloatType::kBFloat16) return "q must be bfloat16";
  const bool fp8 = problem.kv_format == KvFormat::kFp8;
  if (fp8 && problem.h_kv != 1) return "the FP8 cache has one KV head";
  if (!fp8 && problem.page_size != kKeys) return "the page size of a bf16 cache must be 64";
  if (problem.max_blocks * problem.page_size > INT32_MAX) return "too many tokens per request";
  if (problem.num_blocks * problem.page_size > INT32_MAX) return "too many cache rows";
  if (problem.h_kv > 65535) return "h_kv must be at most 65535 (grid z)";
  return std::string();
}

std::string mla_decode_sm90(const DecodeProblem& problem, const DecodeBuffers& buffers,
                            cudaStream_t stream) {
  if (std::string why = unsupported(problem); !why.empty()) return why;
  Params p;
  p.batch = static_cast<int>(problem.batch);
  p.s_q = static_cast<int>(problem.s_q);
  p.h_q = static_cast<int>(problem.h_q);
  p.h_kv = static_cast<int>(problem.h_kv);
  p.heads_per_kv = static_cast<int>(problem.h_q / problem.h_kv);
  p.rows = p.s_q * p.heads_per_kv;
  p.max_blocks = static_cast<int>(problem.max_blocks);
  p.num_blocks = static_cast<int>(problem.num_blocks);
  p.page_size = static_cast<int>(problem.page_size);
  p.kv = static_cast<const uint8_t*>(buffers.kv);
  p.parts = static_cast<int>(problem.num_sm_parts);
  p.scale_log2 = problem.softmax_scale * kLog2e;
  p.causal = problem.causal && problem.s_q > 1;
  p.q = static_cast<const __nv_bfloat16*>(buffers.q);
  p.block_table = buffers.block_table;
  p.seqlens = buffers.seqlens;
  p.metadata = buffers.tile_metadata;
  p.num_splits = buffers.num_splits;
  p.out = static_cast<__nv_bfloat16*>(buffers.out);
  p.lse = buffers.lse;
  p.o_accum = buffers.o_accum;
  p.lse_accum = buffers.lse_accum;

  const bool fp8 = problem.kv_format == KvFormat::kFp8;
  // bf16 kv_cache [num_blocks * 64 tokens, h_kv, 576]; box: 64 channels x 1 head x 64 tokens.
  // The FP8 cache is read without TMA (the map stays zero and unused).
  CUtensorMap kv_map{};
  if (!fp8) {
    const uint64_t dims[3] = {static_cast<uint64_t>(kQkDim), static_cast<uint64_t>(problem.h_kv),
                              static_cast<uint64_t>(problem.num_blocks * kKeys)};
    const uint64_t strides[2] = {kQkDim * 2, static_cast<uint64_t>(problem.h_kv) * kQkDim * 2};
    const uint32_t box[3] = {kChunk, 1, kKeys};
    if (const char* error = ptx::encode_tensor_map(&kv_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3,
                                                   buffers.kv, dims, strides, box,
                                                   CU_TENSOR_MAP_SWIZZLE_128B)) {
      return error;
    }
  }
  auto* kernel = fp8 ? &mla_decode_kernel<true> : &mla_decode_kernel<false>;
  cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  const dim3 grid(static_cast<unsigned>(p.parts), static_cast<unsigned>((p.rows + kRows - 1) / kRows),
                  static_cast<unsigned>(p.h_kv));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(kv_map, p);
  status = cudaGetLastError();
  if (status != cudaSuccess) return cudaGetErrorString(status);
  const int64_t items = problem.batch * problem.h_kv * p.rows;
  mla_combine_kernel<<<static_cast<unsigned>((items + kCombineWarps - 1) / kCombineWarps),
                       kCombineWarps * 32, 0, stream>>>(p);
  status = cudaGetLastError();
  return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
}

}  // namespace sm90
}  // namespace mla
}  // namespace jaxinfra
