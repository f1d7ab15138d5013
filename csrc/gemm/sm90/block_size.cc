// The block-size heuristic of the Hopper FP8 GEMMs: deterministic (no
// autotuning), from the problem sizes and the SM count only.
//
//   block_m: 64 when every problem has at most 64 rows (one math warpgroup),
//            else 128 (two math warpgroups of 64 rows each).
//   block_n: from the instantiated set {64, 96, 112, 128, 144, 160} (112, 144
//            and 160 are not powers of two: a tile may straddle two 128-row
//            weight-scale blocks; the kernel picks the scale per 8 columns).
//            Each candidate costs waves * block_n, where waves =
//            ceil(tiles / num_sms) and a wave's time grows with the tile's
//            width; the cheapest wins, ties going to the wider block (fewer
//            tiles, more reuse of A). Example (DeepGEMM's README): m = 256,
//            n = 7168 on 132 SMs gives 128 x 112 tiles, 128 tiles in one wave,
//            where 128 x 128 would give 112.
//   ctas:    the fewest CTAs that keep the same number of waves,
//            ceil(tiles / waves) (less L2 pressure, same time).
#include <cstdint>

#include "gemm/sm90/fp8_gemm_sm90.h"

namespace jaxinfra {
namespace gemm {
namespace sm90 {

namespace {
constexpr int kBlockNs[] = {64, 96, 112, 128, 144, 160};
}  // namespace

BlockConfig choose_block_config(RowLayout layout, int64_t problems, int64_t m, int64_t n,
                                int num_sms) {
  BlockConfig best;
  const bool contiguous =
      layout == RowLayout::kContiguousIndices || layout == RowLayout::kContiguousEnds;
  best.block_m = (m <= 64 && !contiguous) ? 64 : 128;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  const int64_t m_blocks = ceil_div(m > 0 ? m : 1, best.block_m);
  int64_t best_cost = -1;
  for (int block_n : kBlockNs) {
    const int64_t tiles = problems * m_blocks * ceil_div(n, block_n);
    const int64_t waves = ceil_div(tiles, sms);
    const int64_t cost = waves * block_n;
    if (best_cost < 0 || cost <= best_cost) {  // <=: ties go to the wider block
      best_cost = cost;
      best.block_n = block_n;
      best.tiles = tiles;
    }
  }
  const int64_t waves = ceil_div(best.tiles, sms);
  best.ctas = static_cast<int>(best.tiles > 0 ? ceil_div(best.tiles, waves) : 1);
  return best;
}

}  // namespace sm90
}  // namespace gemm
}  // namespace jaxinfra
