// Local permute/unpermute for mixture-of-experts layers: reference CPU loops.
//
// Both ops are driven by a row map `map [n, d]` (int32): copy j of source row
// i goes to output row map[i * d + j], or nowhere when the entry is outside
// [0, m) (-1 marks "no copy"). jaxinfra/moe/permute.py computes the maps
// (a stable sort of token copies by expert) and implements the same contract
// in pure JAX; the two agree bit for bit.
//
// Plain C++: no XLA or Python headers.
#pragma once

#include <cstdint>

namespace jaxinfra {
namespace moe {

enum class FloatType { kFloat32, kBFloat16 };

// Scatter-copy: x [n, row_bytes] -> out [m, row_bytes] with
// out[map[i, j]] = x[i] for every entry of map in [0, m); rows no entry
// points at are zero. Any element type (rows are copied as bytes). Each valid
// map entry must be distinct (permute maps are injective); if two entries name
// the same row, the later one (in i, then j order) wins.
void permute_rows_cpu(const uint8_t* x, int64_t n, int64_t d, int64_t row_bytes,
                      const int32_t* map, int64_t m, uint8_t* out);

// Gather-reduce: y [m, h] -> out [n, h] with
//   out[i] = sum over j = 0 .. d-1 of (map[i, j] in [0, m) ? weights[i, j] * y[map[i, j]] : 0)
// accumulated in float32 in j order (acc = acc + term, starting from +0.0),
// then rounded to y's type (round to nearest even).
void unpermute_rows_cpu(const void* y, FloatType type, int64_t m, int64_t h, const int32_t* map,
                        const float* weights, int64_t n, int64_t d, void* out);

}  // namespace moe
}  // namespace jaxinfra
