// Ragged attention over the paged KV cache for XLA:CPU, registered as an XLA FFI target
// (jinfer/native/library.py). It computes what `paged_attention_reference` in jinfer/ops/attention.py
// defines, but reads each row's keys and values where they lie in the page pool, and only the
// positions a query sees: no gather of the row's pages, no transposes, no masked-out work.
//
// A unit of work is one row's block of up to kTokensPerUnit consecutive tokens against one KV head:
// the keys and values of a block of 16 positions are read once for every query head of the group
// and every token of the block (online softmax, float32). Scores for 16 positions come out as one
// vector: 16 dot products accumulated lane-wise, then summed across lanes together (sum_lanes_16).
// Needs a head dimension that is a multiple of 16: jinfer/native/attention.py checks before calling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jinfer;

namespace {

using Queries = ffi::Buffer<ffi::F32, 3>;  // [T, H, D]
using Pages = ffi::Buffer<ffi::F32, 4>;  // [num_pages, page_size, K, D]
using Indices = ffi::Buffer<ffi::S32, 1>;
using PageTable = ffi::Buffer<ffi::S32, 2>;  // [R, P]
using Outputs = ffi::ResultBuffer<ffi::F32, 3>;  // [T, H, D]

constexpr int64_t kTokensPerUnit = 16;
constexpr float kMasked = -1e30f;

// out[j] = sum_lanes(a[j]) for 16 vectors: four rounds of folding pairs of vectors into one.
inline f32x16 sum_lanes_16(const f32x16 a[16]) {
  f32x16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: halves of a[2i]; lanes 8-15: of a[2i+1]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // four lanes each of a[4i] ... a[4i+3]
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // two lanes each of a[8i] ... a[8i+7]
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline float max_lanes(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp of every lane: 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor
// series to r^7 (relative error ~1e-7). Lanes below -87 give ~0 (the masked scores).
inline f32x16 exp_lanes(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.0f, hi = f32x16{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  f32x16 n = (x * 1.44269504f + kRound) - kRound;
  f32x16 r = x - n * 0.693145752f - n * 1.42860677e-6f;
  f32x16 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Problem {
  const float* q;  // [T, H, D]
  const float* k_pages;  // [num_pages, page_size, K, D]
  const float* v_pages;
  const int32_t* positions;  // [T]
  const int32_t* page_table;  // [R, P]
  const int32_t* kv_lens;  // [R]
  float* out;  // [T, H, D]
  int64_t heads, kv_heads, head_dim, page_size, pages_per_row;
  float scale, softcap;
  int64_t window;

  // Where position j of row r keeps its K (or V) of KV head h: [D] floats.
  int64_t slot_offset(int64_t r, int64_t j, int64_t h) const {
    int64_t page = page_table[r * pages_per_row + j / page_size];
    return ((page * page_size + j % page_size) * kv_heads + h) * head_dim;
  }
};

// The positions token t of row r sees: [first, last] (empty when last < first).
struct Visible {
  int64_t first, last;
};

Visible visible(const Problem& p, int64_t r, int64_t t) {
  int64_t position = p.positions[t];
  int64_t last = std::min<int64_t>({position, p.kv_lens[r] - 1, p.pages_per_row * p.page_size - 1});
  int64_t first = p.window > 0 ? std::max<int64_t>(0, position - p.window + 1) : 0;
  return {first, last};
}

// Tokens [t0, t1) of row r against KV head h: every query head h * G + g of each token.
void attend(const Problem& p, int64_t r, int64_t t0, int64_t t1, int64_t h) {
  const int64_t groups = p.heads / p.kv_heads, d = p.head_dim, chunks = d / kLanes;
  const int64_t queries = (t1 - t0) * groups;
  thread_local std::vector<float> acc, running_max, total;
  thread_local std::vector<Visible> sees;
  acc.assign(queries * d, 0.0f);
  running_max.assign(queries, kMasked);
  total.assign(queries, 0.0f);
  sees.resize(t1 - t0);
  int64_t first = INT64_MAX, last = -1;
  for (int64_t t = t0; t < t1; ++t) {
    sees[t - t0] = visible(p, r, t);
    first = std::min(first, sees[t - t0].first);
    last = std::max(last, sees[t - t0].last);
  }
  const f32x16 lane_ids = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const float* keys[kLanes];
  const float* values[kLanes];
  for (int64_t j0 = first - first % kLanes; j0 <= last; j0 += kLanes) {
    int64_t block = std::min<int64_t>(kLanes, last + 1 - j0);
    for (int64_t j = 0; j < block; ++j) {
      int64_t offset = p.slot_offset(r, j0 + j, h);
      keys[j] = p.k_pages + offset;
      values[j] = p.v_pages + offset;
    }
    // Lanes past the block repeat its last key so that the dot products below run over all 16 lanes
    // (a loop of fixed length keeps them in registers); their scores are masked.
    for (int64_t j = block; j < kLanes; ++j) keys[j] = keys[block - 1];
    for (int64_t t = t0; t < t1; ++t) {
      Visible seen = sees[t - t0];
      if (seen.last < j0 || seen.first >= j0 + block) continue;
      f32x16 lane_positions = lane_ids + float(j0);
      auto hidden = (lane_positions < float(seen.first)) | (lane_positions > float(seen.last));
      // Values are read only where seen: a stale page behind the window may hold NaN.
      int64_t seen_from = std::max<int64_t>(0, seen.first - j0), seen_to = std::min(block, seen.last + 1 - j0);
      for (int64_t g = 0; g < groups; ++g) {
        int64_t query = (t - t0) * groups + g;
        const float* qv = p.q + (t * p.heads + h * groups + g) * d;
        f32x16 dots[kLanes] = {};
        for (int64_t c = 0; c < chunks; ++c) {
          f32x16 qc = load_f32(qv + c * kLanes);
          for (int64_t j = 0; j < kLanes; ++j) dots[j] += qc * load_f32(keys[j] + c * kLanes);
        }
        f32x16 scores = sum_lanes_16(dots) * p.scale;
        if (p.softcap > 0)
          for (int i = 0; i < kLanes; ++i) scores[i] = std::tanh(scores[i] / p.softcap) * p.softcap;
        scores = hidden ? kMasked : scores;
        float new_max = std::max(running_max[query], max_lanes(scores));
        float rescale = std::exp(running_max[query] - new_max);
        f32x16 probs = exp_lanes(scores - new_max);
        probs = hidden ? 0.0f : probs;
        running_max[query] = new_max;
        total[query] = total[query] * rescale + sum_lanes(probs);
        float* out = acc.data() + query * d;
        for (int64_t c = 0; c < chunks; ++c) {
          f32x16 o = load_f32(out + c * kLanes) * rescale;
          for (int64_t j = seen_from; j < seen_to; ++j) o += probs[j] * load_f32(values[j] + c * kLanes);
          store_f32(out + c * kLanes, o);
        }
      }
    }
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      int64_t query = (t - t0) * groups + g;
      float inverse = total[query] > 0 ? 1.0f / total[query] : 0.0f;
      float* out = p.out + (t * p.heads + h * groups + g) * d;
      for (int64_t c = 0; c < chunks; ++c) store_f32(out + c * kLanes, load_f32(acc.data() + query * d + c * kLanes) * inverse);
    }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, Queries q, Pages k_pages, Pages v_pages, Indices positions,
                          Indices query_start, Indices kv_lens, PageTable page_table, float scale, int64_t window,
                          float softcap, Outputs out) {
  const int64_t tokens = q.dimensions()[0], heads = q.dimensions()[1], head_dim = q.dimensions()[2];
  const int64_t rows = page_table.dimensions()[0];
  Problem p{q.typed_data(), k_pages.typed_data(), v_pages.typed_data(), positions.typed_data(),
            page_table.typed_data(), kv_lens.typed_data(), out->typed_data(), heads, k_pages.dimensions()[2],
            head_dim, k_pages.dimensions()[1], page_table.dimensions()[1], scale, softcap, window};
  const int32_t* starts = query_start.typed_data();
  struct Unit {
    int64_t row, t0, t1;
  };
  std::vector<Unit> units;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t0 = starts[r]; t0 < starts[r + 1]; t0 += kTokensPerUnit)
      units.push_back({r, t0, std::min<int64_t>(starts[r + 1], t0 + kTokensPerUnit)});
  int64_t padding = std::max<int64_t>(0, tokens - starts[rows]);
  std::memset(p.out + (tokens - padding) * heads * head_dim, 0, padding * heads * head_dim * sizeof(float));
  run_units(pool, int64_t(units.size()) * p.kv_heads, [&](int64_t unit) {
    const Unit& u = units[unit / p.kv_heads];
    attend(p, u.row, u.t0, u.t1, unit % p.kv_heads);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_paged_attention_f32, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Queries>()
                                  .Arg<Pages>()
                                  .Arg<Pages>()
                                  .Arg<Indices>()
                                  .Arg<Indices>()
                                  .Arg<Indices>()
                                  .Arg<PageTable>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Ret<Queries>());
