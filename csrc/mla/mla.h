// MLA decode over a paged latent cache: reference CPU loops that execute
// FlashMLA's split-KV schedule (see jaxinfra/mla/schedule.py).
//
// Contract (shared with jaxinfra/mla/decode.py and the future CUDA kernel;
// ffi/mla.cc documents the buffers):
//   * Request r's token t lives in row t % page of page block_table[r, t / page].
//     Only tokens t < seqlens[r] are read. A request whose length is outside
//     [0, max_blocks * page] or whose needed pages are outside [0, num_blocks)
//     is "bad": its out and lse become NaN and nothing of it is read.
//   * Query rows are FlashMLA's q_seq_per_hk order: for KV head g, row
//     m = s * (h_q / h_kv) + j is query token s of head g * (h_q / h_kv) + j.
//     Causal rows (s_q > 1) see the first seqlen - (s_q - 1 - s) keys.
//   * Scores are softmax_scale * q . k over 576 channels; values are the first
//     512 channels of the same rows; everything accumulates in float32.
//   * Keys are processed in 64-key tiles. tile_metadata[p] = {begin_req,
//     end_req (inclusive), begin_tile, end_tile (exclusive), begin_split,
//     first_split, last_split, pad} assigns tile ranges to SM part p;
//     num_splits[b + 1] is the prefix sum of splits per request. A request with
//     one split writes out/lse directly; split k of a split request writes its
//     normalized partial output and natural-log lse to workspace slot
//     num_splits[r] + k, and a combine pass merges the slots.
//   * A row with no visible key: out 0, lse +inf.
// Plain C++: no XLA or Python headers.
#pragma once

#include <cstdint>
#include <string>

namespace jaxinfra {
namespace mla {

constexpr int64_t kQkDim = 576;         // 512 latent + 64 RoPE channels
constexpr int64_t kVDim = 512;          // V = first 512 channels of the rows
constexpr int64_t kFp8RecordBytes = 656;
constexpr int64_t kTileKeys = 64;       // keys per scheduler tile
constexpr int64_t kMetadataWidth = 8;   // int32s per tile_metadata row

enum class FloatType { kBFloat16, kFloat32 };
enum class KvFormat { kUnquantized, kFp8 };

struct DecodeProblem {
  int64_t batch = 0, s_q = 0, h_q = 0, h_kv = 0;
  int64_t num_blocks = 0, page_size = 0, max_blocks = 0;
  int64_t num_sm_parts = 0;
  FloatType q_type = FloatType::kBFloat16;  // q, out, and an unquantized cache
  KvFormat kv_format = KvFormat::kUnquantized;
  float softmax_scale = 1.0f;
  bool causal = false;  // bottom-right aligned; only meaningful for s_q > 1
};

struct DecodeBuffers {
  const void* q = nullptr;              // [b, s_q, h_q, 576]
  const void* kv = nullptr;             // [num_blocks, page, h_kv, 576] or uint8 [.., 1, 656]
  const int32_t* block_table = nullptr; // [b, max_blocks]
  const int32_t* seqlens = nullptr;     // [b]
  const int32_t* tile_metadata = nullptr;  // [num_sm_parts, 8]
  const int32_t* num_splits = nullptr;  // [b + 1]
  void* out = nullptr;                  // [b, s_q, h_q, 512]
  float* lse = nullptr;                 // [b, h_q, s_q]
  float* o_accum = nullptr;             // [b + num_sm_parts, h_kv, rows, 512]
  float* lse_accum = nullptr;           // [b + num_sm_parts, h_kv, rows]
};

// Checks that tile_metadata / num_splits partition every request's tiles
// (max(1, ceil(seqlen / 64)), bad requests counting as length 0) into
// contiguous, in-order splits, with num_splits[b] <= b + num_sm_parts.
// Returns "" when they do, else what is wrong. Reads only the given buffers.
std::string check_schedule(const DecodeProblem& problem, const DecodeBuffers& buffers);

// Runs the decode. Requires check_schedule(problem, buffers) == "".
void mla_decode_cpu(const DecodeProblem& problem, const DecodeBuffers& buffers);

}  // namespace mla
}  // namespace jaxinfra
