// Reference loops for MLA decode (see mla.h). Written to be read: each SM part
// of the schedule is a loop over its requests and 64-key tiles, with the
// online softmax a GPU kernel keeps in registers kept here in plain arrays;
// split requests go through the workspace and a combine pass.
#include "mla/mla.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/fp8_e4m3.h"

namespace jaxinfra {
namespace mla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kNopeDim = 512;
constexpr int64_t kScaleBlock = 128;

// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN.
uint16_t float_to_bf16_bits(float v) {
  const uint32_t b = fp8::float_bits(v);
  if (fp8::is_nan(v)) return static_cast<uint16_t>((b >> 16) | 0x0040u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// e4m3fn bits -> float32 (exact): 1 sign, 4 exponent (bias 7), 3 mantissa bits;
// 0x7f / 0xff are NaN, there are no infinities.
float e4m3_to_float(uint8_t bits) {
  const float sign = (bits & 0x80u) ? -1.0f : 1.0f;
  const int exponent = (bits >> 3) & 0xf;
  const int mantissa = bits & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return kNaN;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
}

float read_float(const void* data, FloatType type, int64_t i) {
  if (type == FloatType::kFloat32) return static_cast<const float*>(data)[i];
  return fp8::bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
}

void write_float(void* data, FloatType type, int64_t i, float v) {
  if (type == FloatType::kFloat32) {
    static_cast<float*>(data)[i] = v;
  } else {
    static_cast<uint16_t*>(data)[i] = float_to_bf16_bits(v);
  }
}

// A 576-wide dot product with eight independent partial sums (so the
// compiler can vectorize it without reassociating float math itself).
float dot(const float* a, const float* b) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < kQkDim; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What the loops need to know about one request.
struct Request {
  bool bad = false;     // length or a needed page out of range: NaN results
  int64_t length = 0;   // tokens to read (0 when bad)
  int64_t tiles = 1;    // max(1, ceil(length / 64))
  int64_t first_slot = 0, num_splits = 1;
};

std::vector<Request> describe_requests(const DecodeProblem& shape, const DecodeBuffers& buf) {
  std::vector<Request> requests(shape.batch);
  const int64_t capacity = shape.max_blocks * shape.page_size;
  for (int64_t r = 0; r < shape.batch; ++r) {
    Request& req = requests[r];
    const int64_t length = buf.seqlens[r];
    req.bad = length < 0 || length > capacity;
    for (int64_t j = 0; !req.bad && j < ceil_div(length, shape.page_size); ++j) {
      const int64_t id = buf.block_table[r * shape.max_blocks + j];
      req.bad = id < 0 || id >= shape.num_blocks;
    }
    req.length = req.bad ? 0 : length;
    req.tiles = std::max<int64_t>(1, ceil_div(req.length, kTileKeys));
  }
  return requests;
}

// Converts a request's token t, KV head g, to 576 floats.
void load_key(const DecodeProblem& shape, const DecodeBuffers& buf, int64_t r, int64_t g,
              int64_t t, float* key) {
  const int64_t page = buf.block_table[r * shape.max_blocks + t / shape.page_size];
  const int64_t row = page * shape.page_size + t % shape.page_size;
  if (shape.kv_format == KvFormat::kUnquantized) {
    const int64_t base = (row * shape.h_kv + g) * kQkDim;
    for (int64_t c = 0; c < kQkDim; ++c) key[c] = read_float(buf.kv, shape.q_type, base + c);
    return;
  }
  const uint8_t* record = static_cast<const uint8_t*>(buf.kv) + row * kFp8RecordBytes;
  float scales[kNopeDim / kScaleBlock];
  std::memcpy(scales, record + kNopeDim, sizeof(scales));
  for (int64_t c = 0; c < kNopeDim; ++c) key[c] = e4m3_to_float(record[c]) * scales[c / kScaleBlock];
  const uint8_t* rope = record + kNopeDim + sizeof(scales);
  for (int64_t c = kNopeDim; c < kQkDim; ++c) {
    uint16_t bits;
    std::memcpy(&bits, rope + 2 * (c - kNopeDim), sizeof(bits));
    key[c] = fp8::bf16_bits_to_float(bits);
  }
}

// Online-softmax state of the query rows of one (request, KV head) chunk.
struct Rows {
  int64_t count = 0;
  std::vector<float> q;       // [count, 576]
  std::vector<int64_t> visible;  // keys each row may see
  std::vector<float> max, sum;   // running max of scaled scores, sum of exps
  std::vector<float> acc;     // [count, 512] unnormalized output

  float lse(int64_t m) const { return sum[m] > 0 ? max[m] + std::log(sum[m]) : -kInf; }
  float out(int64_t m, int64_t c) const { return sum[m] > 0 ? acc[m * kVDim + c] / sum[m] : 0.0f; }
};

Rows load_rows(const DecodeProblem& shape, const DecodeBuffers& buf, int64_t r, int64_t g,
               int64_t length) {
  const int64_t per_kv = shape.h_q / shape.h_kv;
  Rows rows;
  rows.count = shape.s_q * per_kv;
  rows.q.resize(rows.count * kQkDim);
  rows.visible.resize(rows.count);
  rows.max.assign(rows.count, -kInf);
  rows.sum.assign(rows.count, 0.0f);
  rows.acc.assign(rows.count * kVDim, 0.0f);
  for (int64_t m = 0; m < rows.count; ++m) {
    const int64_t s = m / per_kv, h = g * per_kv + m % per_kv;
    const int64_t base = ((r * shape.s_q + s) * shape.h_q + h) * kQkDim;
    for (int64_t c = 0; c < kQkDim; ++c) rows.q[m * kQkDim + c] = read_float(buf.q, shape.q_type, base + c);
    const int64_t behind = shape.causal ? shape.s_q - 1 - s : 0;
    rows.visible[m] = std::max<int64_t>(length - behind, 0);
  }
  return rows;
}

// Attends rows to keys [tile_begin * 64, min(tile_end * 64, length)).
void attend_tiles(const DecodeProblem& shape, const DecodeBuffers& buf, int64_t r, int64_t g, int64_t length, int64_t tile_begin, int64_t tile_end,
                  Rows* rows) {
  std::vector<float> keys(kTileKeys * kQkDim);
  float scores[kTileKeys];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * kTileKeys, t1 = std::min(t0 + kTileKeys, length);
    for (int64_t t = t0; t < t1; ++t) load_key(shape, buf, r, g, t, &keys[(t - t0) * kQkDim]);
    for (int64_t m = 0; m < rows->count; ++m) {
      const int64_t n = std::min(t1, rows->visible[m]) - t0;
      if (n <= 0) continue;
      float tile_max = -kInf;
      for (int64_t k = 0; k < n; ++k) {
        scores[k] = shape.softmax_scale * dot(&rows->q[m * kQkDim], &keys[k * kQkDim]);
        tile_max = std::max(tile_max, scores[k]);
      }
      const float new_max = std::max(rows->max[m], tile_max);
      const float rescale = std::exp(rows->max[m] - new_max);  // 0 on the first tile
      float* acc = &rows->acc[m * kVDim];
      rows->sum[m] *= rescale;
      for (int64_t c = 0; c < kVDim; ++c) acc[c] *= rescale;
      for (int64_t k = 0; k < n; ++k) {
        const float p = std::exp(scores[k] - new_max);
        rows->sum[m] += p;
        const float* v = &keys[k * kQkDim];
        for (int64_t c = 0; c < kVDim; ++c) acc[c] += p * v[c];
      }
      rows->max[m] = new_max;
    }
  }
}

// Index helpers for out [b, s_q, h_q, 512], lse [b, h_q, s_q] and the workspace.
struct Layout {
  const DecodeProblem& shape;
  int64_t per_kv() const { return shape.h_q / shape.h_kv; }
  int64_t rows() const { return shape.s_q * per_kv(); }
  int64_t head(int64_t g, int64_t m) const { return g * per_kv() + m % per_kv(); }
  int64_t out(int64_t r, int64_t g, int64_t m) const {
    return ((r * shape.s_q + m / per_kv()) * shape.h_q + head(g, m)) * kVDim;
  }
  int64_t lse(int64_t r, int64_t g, int64_t m) const {
    return (r * shape.h_q + head(g, m)) * shape.s_q + m / per_kv();
  }
  int64_t accum(int64_t slot, int64_t g, int64_t m) const {
    return (slot * shape.h_kv + g) * rows() + m;
  }
};

void write_final(const Layout& at, const DecodeBuffers& buf, int64_t r, int64_t g, int64_t m,
                 float lse, const float* out_row) {
  buf.lse[at.lse(r, g, m)] = lse == -kInf ? kInf : lse;
  for (int64_t c = 0; c < kVDim; ++c) {
    write_float(buf.out, at.shape.q_type, at.out(r, g, m) + c, out_row ? out_row[c] : 0.0f);
  }
}

// One SM part: its requests' tile ranges; unsplit requests finish here.
void run_part(const DecodeProblem& shape, const DecodeBuffers& buf,
              const std::vector<Request>& requests, const int32_t* meta) {
  const Layout at{shape};
  const int64_t begin_req = meta[0], end_req = meta[1];
  std::vector<float> row_out(kVDim);
  for (int64_t r = begin_req; r <= end_req; ++r) {
    const Request& req = requests[r];
    const int64_t tile_begin = r == begin_req ? meta[2] : 0;
    const int64_t tile_end = r == end_req ? meta[3] : req.tiles;
    const int64_t split = r == begin_req ? meta[4] : 0;
    if (req.bad || tile_begin >= tile_end) continue;
    for (int64_t g = 0; g < shape.h_kv; ++g) {
      Rows rows = load_rows(shape, buf, r, g, req.length);
      attend_tiles(shape, buf, r, g, req.length, tile_begin, tile_end, &rows);
      for (int64_t m = 0; m < rows.count; ++m) {
        for (int64_t c = 0; c < kVDim; ++c) row_out[c] = rows.out(m, c);
        if (req.num_splits == 1) {
          write_final(at, buf, r, g, m, rows.lse(m), row_out.data());
        } else {
          const int64_t slot = at.accum(req.first_slot + split, g, m);
          buf.lse_accum[slot] = rows.lse(m);
          std::memcpy(&buf.o_accum[slot * kVDim], row_out.data(), kVDim * sizeof(float));
        }
      }
    }
  }
}

// The combine kernel: merges a split request's partials by their lse.
void combine(const DecodeProblem& shape, const DecodeBuffers& buf, int64_t r, const Request& req) {
  const Layout at{shape};
  std::vector<float> merged(kVDim);
  for (int64_t g = 0; g < shape.h_kv; ++g) {
    for (int64_t m = 0; m < at.rows(); ++m) {
      float top = -kInf;
      for (int64_t k = 0; k < req.num_splits; ++k) {
        top = std::max(top, buf.lse_accum[at.accum(req.first_slot + k, g, m)]);
      }
      if (top == -kInf) {  // no split saw a key
        write_final(at, buf, r, g, m, -kInf, nullptr);
        continue;
      }
      float total = 0.0f;
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t k = 0; k < req.num_splits; ++k) {
        const int64_t slot = at.accum(req.first_slot + k, g, m);
        const float w = std::exp(buf.lse_accum[slot] - top);
        total += w;
        for (int64_t c = 0; c < kVDim; ++c) merged[c] += w * buf.o_accum[slot * kVDim + c];
      }
      for (int64_t c = 0; c < kVDim; ++c) merged[c] /= total;
      write_final(at, buf, r, g, m, top + std::log(total), merged.data());
    }
  }
}

void poison(const DecodeProblem& shape, const DecodeBuffers& buf, int64_t r) {
  const Layout at{shape};
  for (int64_t g = 0; g < shape.h_kv; ++g) {
    for (int64_t m = 0; m < at.rows(); ++m) {
      buf.lse[at.lse(r, g, m)] = kNaN;
      for (int64_t c = 0; c < kVDim; ++c) write_float(buf.out, shape.q_type, at.out(r, g, m) + c, kNaN);
    }
  }
}

}  // namespace

std::string check_schedule(const DecodeProblem& shape, const DecodeBuffers& buf) {
  const int64_t b = shape.batch;
  const std::vector<Request> requests = describe_requests(shape, buf);
  const int32_t* splits = buf.num_splits;
  if (splits[0] != 0) return "num_splits[0] must be 0";
  for (int64_t r = 0; r < b; ++r) {
    if (static_cast<int64_t>(splits[r + 1]) - splits[r] < 1) {
      return "num_splits must increase by at least 1 per request (request " + std::to_string(r) + ")";
    }
  }
  if (splits[b] > b + shape.num_sm_parts) return "num_splits[b] exceeds b + num_sm_parts";
  std::vector<int64_t> next_tile(b, 0), next_split(b, 0);
  for (int64_t p = 0; p < shape.num_sm_parts; ++p) {
    const int32_t* meta = buf.tile_metadata + p * kMetadataWidth;
    const int64_t begin_req = meta[0], end_req = meta[1];
    if (begin_req > end_req) continue;  // an idle part
    const std::string where = "tile_scheduler_metadata row " + std::to_string(p);
    if (begin_req < 0 || end_req >= b) return where + ": request range out of [0, b)";
    for (int64_t r = begin_req; r <= end_req; ++r) {
      const int64_t tile_begin = r == begin_req ? meta[2] : 0;
      const int64_t tile_end = r == end_req ? meta[3] : requests[r].tiles;
      const int64_t split = r == begin_req ? meta[4] : 0;
      const std::string req = where + ", request " + std::to_string(r);
      if (tile_begin != next_tile[r]) return req + ": tiles do not continue where the last split ended";
      if (tile_end < tile_begin || tile_end > requests[r].tiles) return req + ": tile range out of range";
      if (tile_end == tile_begin) continue;  // nothing to do (an idle part inside a request)
      if (split != next_split[r]) return req + ": split index out of order";
      const bool is_split = splits[r + 1] - splits[r] > 1;
      if ((r == begin_req && (meta[5] != 0) != is_split) || (r == end_req && (meta[6] != 0) != is_split)) {
        return req + ": split flags disagree with num_splits";
      }
      next_tile[r] = tile_end;
      ++next_split[r];
    }
  }
  for (int64_t r = 0; r < b; ++r) {
    if (next_tile[r] != requests[r].tiles || next_split[r] != splits[r + 1] - splits[r]) {
      return "the schedule does not cover request " + std::to_string(r) +
             " (recompute it with get_mla_metadata for these cache_seqlens)";
    }
  }
  return "";
}

void mla_decode_cpu(const DecodeProblem& problem, const DecodeBuffers& buf) {
  std::vector<Request> requests = describe_requests(problem, buf);
  for (int64_t r = 0; r < problem.batch; ++r) {
    requests[r].first_slot = buf.num_splits[r];
    requests[r].num_splits = buf.num_splits[r + 1] - buf.num_splits[r];
  }
  for (int64_t p = 0; p < problem.num_sm_parts; ++p) {
    run_part(problem, buf, requests, buf.tile_metadata + p * kMetadataWidth);
  }
  for (int64_t r = 0; r < problem.batch; ++r) {
    if (requests[r].bad) {
      poison(problem, buf, r);
    } else if (requests[r].num_splits > 1) {
      combine(problem, buf, r, requests[r]);
    }
  }
}

}  // namespace mla
}  // namespace jaxinfra
