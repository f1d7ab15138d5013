// Persistent tile scheduler of the Hopper FP8 GEMMs, shared by the dense,
// masked and contiguous layouts (one mainloop, one scheduler).
//
// The tile space is problems x m_blocks x n_blocks; CTA c takes tiles c,
// c + gridDim.x, ... Inside a problem, tiles are rastered in groups of
// kRasterNBlocks N blocks (M fastest inside a group) so that the CTAs running
// at the same time share A rows and a few B tiles in L2.
//
// Each tile resolves to:
//   row0     first D row of the tile, in the flattened [problems * m, n] D
//   a_row0   first A row, in the flattened [problems * m, k] A (kKGrouped: A is shared)
//   b_row0   first B row, in the flattened [problems * groups * n, k] B
//   kb0, k_blocks  the tile's 128-wide K blocks (kKGrouped: its group's segment)
//   valid    false for a kKGrouped group after an invalid group_k (its D is NaN)
//   group    the B matrix (contiguous layouts: the group of the tile's first
//            row that belongs to a group; -1 when no row does)
//   rows     rows of the tile that exist (m - m_block * block_m, at most block_m)
//   valid_rows  rows below masked_m (kMasked), else rows
//   compute  false when no row of the tile is computed (masked rows past
//            masked_m, all-padding contiguous blocks): the mainloop is skipped
//            and the epilogue writes zeros.
// A row of a contiguous tile whose group differs from the tile's group is not
// written by the GEMM kernel; the fix-up kernel (fp8_gemm_sm90.cu) computes it.
#pragma once

#include <cstdint>

#include "gemm/gemm.h"
#include "gemm/sm90/fp8_gemm_sm90.h"

namespace jaxinfra {
namespace gemm {
namespace sm90 {

constexpr int kRasterNBlocks = 16;

struct SchedulerParams {
  RowLayout layout;
  int problems, m, n, groups, alignment;
  int k_blocks;               // ceil(k / 128) of the whole K
  int m_blocks, n_blocks;
  const int32_t* row_layout;  // see Fp8GemmArgs
};

struct Tile {
  int problem, m_block, n_block;
  int group;
  int kb0, k_blocks;
  bool valid;
  int rows;        // rows of the tile inside [0, m)
  int valid_rows;  // rows the layout computes (masked: up to masked_m; else rows)
  bool compute;
  int64_t row0, a_row0, b_row0;
};

// Group of row `row` (< m) of problem `problem` in a contiguous layout, or -1.
// kContiguousEnds reads `ends`, the problem's group ends after the running
// maximum (in shared memory, see prefix_max_ends).
__device__ __forceinline__ int row_group(const SchedulerParams& p, const int32_t* ends,
                                         int problem, int row) {
  if (p.layout == RowLayout::kContiguousIndices) {
    const int32_t g = __ldg(p.row_layout + static_cast<int64_t>(problem) * p.m + row);
    return is_group(g, p.groups) ? g : -1;
  }
  // First group whose end is past the row (ends are non-decreasing).
  int lo = 0, hi = p.groups;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (ends[mid] > row) hi = mid; else lo = mid + 1;
  }
  if (lo >= p.groups) return -1;
  const int64_t begin = lo == 0 ? 0 : group_begin(ends[lo - 1], p.alignment);
  return row >= begin ? lo : -1;
}

// Group of the first row of [row_begin, row_begin + rows) that has one, or -1.
// Called by a whole warp (ballot); every lane gets the answer.
__device__ __forceinline__ int block_group(const SchedulerParams& p, const int32_t* ends,
                                           int problem, int row_begin, int rows) {
  const int lane = threadIdx.x % 32;
  for (int base = 0; base < rows; base += 32) {
    const int row = base + lane;
    const int g = row < rows ? row_group(p, ends, problem, row_begin + row) : -1;
    const unsigned found = __ballot_sync(0xffffffffu, g >= 0);
    if (found != 0) return __shfl_sync(0xffffffffu, g, __ffs(found) - 1);
  }
  return -1;
}

// Resolves tile `t`; called by a whole warp (the contiguous layouts use a ballot).
// `ends` is the shared-memory layout table (prefix_max_ends / prefix_k_groups).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ Tile resolve_tile(const SchedulerParams& p, const int32_t* ends,
                                             int64_t t) {
  Tile tile;
  const int64_t per_problem = static_cast<int64_t>(p.m_blocks) * p.n_blocks;
  tile.problem = static_cast<int>(t / per_problem);
  const int64_t r = t % per_problem;
  const int64_t raster = static_cast<int64_t>(kRasterNBlocks) * p.m_blocks;
  const int n_group = static_cast<int>(r / raster);
  const int in_group = static_cast<int>(r % raster);
  const int group_width = min(kRasterNBlocks, p.n_blocks - n_group * kRasterNBlocks);
  tile.m_block = in_group / group_width;
  tile.n_block = n_group * kRasterNBlocks + in_group % group_width;
  tile.rows = min(kBlockM, p.m - tile.m_block * kBlockM);
  tile.row0 = static_cast<int64_t>(tile.problem) * p.m + static_cast<int64_t>(tile.m_block) * kBlockM;
  tile.valid_rows = tile.rows;
  tile.a_row0 = tile.row0;
  tile.kb0 = 0;
  tile.k_blocks = p.k_blocks;
  tile.valid = true;
  tile.group = 0;
  tile.compute = true;
  if (p.layout == RowLayout::kMasked) {
    const int64_t valid = masked_rows(__ldg(p.row_layout + tile.problem), p.m);
    tile.compute = static_cast<int64_t>(tile.m_block) * kBlockM < valid;
    tile.valid_rows = static_cast<int>(min(static_cast<int64_t>(tile.rows),
                                     max(valid - static_cast<int64_t>(tile.m_block) * kBlockM,
                                         int64_t{0})));
  } else if (p.layout == RowLayout::kKGrouped) {
    // Problem = K group; A and B are shared: rows relative to one [m, K] / [n, K] matrix.
    tile.a_row0 = static_cast<int64_t>(tile.m_block) * kBlockM;
    tile.kb0 = ends[tile.problem];
    tile.k_blocks = ends[p.groups + tile.problem];
    tile.valid = tile.k_blocks >= 0;
    tile.compute = tile.valid;
    if (!tile.valid) tile.k_blocks = 0;
    tile.b_row0 = static_cast<int64_t>(tile.n_block) * kBlockN;
    return tile;
  } else if (p.layout != RowLayout::kDense) {
    tile.group = block_group(p, ends, tile.problem, tile.m_block * kBlockM, tile.rows);
    tile.compute = tile.group >= 0;
  }
  const int g = tile.group < 0 ? 0 : tile.group;
  tile.b_row0 = (static_cast<int64_t>(tile.problem) * p.groups + g) * p.n +
                static_cast<int64_t>(tile.n_block) * kBlockN;
  return tile;
}

// Loads the problem's group ends [groups] into `ends` (shared memory), clamped
// to [0, m] and made non-decreasing (gemm.h's group_end rule): warp 0 scans
// 32 ends at a time with shuffles. Every thread of the CTA calls it (it ends
// with __syncthreads).
__device__ __forceinline__ void prefix_max_ends(const int32_t* raw, int groups, int m,
                                                int32_t* ends) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int32_t carry = 0;
    for (int base = 0; base < groups; base += 32) {
      const int g = base + lane;
      int32_t v = g < groups ? static_cast<int32_t>(clamp64(__ldg(raw + g), 0, m)) : 0;
      v = max(v, carry);
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int32_t other = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v = max(v, other);
      }
      if (g < groups) ends[g] = v;
      carry = __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
}

// kKGrouped: from group_k [groups] fills starts[g] (first K block of group g)
// and counts[g] = group_k[g] / 128, or -1 when group g or one before it is
// invalid (gemm.h's k_group_ok). Warp 0 scans 32 groups at a time; every
// thread of the CTA calls it (it ends with __syncthreads).
__device__ __forceinline__ void prefix_k_groups(const int32_t* group_k, int groups,
                                                int64_t k_total, int32_t* starts,
                                                int32_t* counts) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int64_t start = 0;
    bool valid = true;
    for (int base = 0; base < groups; base += 32) {
      const int g = base + lane;
      // Sizes are clamped so the running sum stays small; a clamped size is invalid anyway.
      const int64_t size = g < groups ? clamp64(__ldg(group_k + g), -1, k_total + 1) : 0;
      int64_t end = size;  // inclusive prefix sum of the sizes
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int64_t other = __shfl_up_sync(0xffffffffu, end, offset);
        if (lane >= offset) end += other;
      }
      const int64_t my_start = start + end - size;
      const bool ok = g >= groups || k_group_ok(static_cast<int32_t>(size), my_start, k_total);
      const unsigned bad = __ballot_sync(0xffffffffu, !ok);
      const bool before_bad = bad == 0 || lane < __ffs(bad) - 1;
      if (g < groups) {
        starts[g] = static_cast<int32_t>(my_start / kBlockK);
        counts[g] = valid && before_bad ? static_cast<int32_t>(size / kBlockK) : -1;
      }
      valid = valid && bad == 0;
      start += __shfl_sync(0xffffffffu, end, 31);
    }
  }
  __syncthreads();
}

}  // namespace sm90
}  // namespace gemm
}  // namespace jaxinfra
