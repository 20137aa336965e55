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
#include <utility>
#include <vector>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jinfer;

namespace {

using Queries = ffi::Buffer<ffi::F32, 3>;  // [T, H, D]
using FloatPageBuffer = ffi::Buffer<ffi::F32, 4>;  // [num_pages, page_size, K, D]
using Int8PageBuffer = ffi::Buffer<ffi::S8, 4>;  // [num_pages, page_size, K, D]
using Scales = ffi::Buffer<ffi::F32, 3>;  // [num_pages, page_size, K]
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

// Page formats: float32 pages, or int8 pages with a float32 scale per position and KV head.
struct FloatPages {
  static constexpr bool kScaled = false;
  using Element = float;
  const float* k;  // [num_pages, page_size, K, D]
  const float* v;
  static f32x16 load(const float* p) { return load_f32(p); }
};

struct Int8Pages {
  static constexpr bool kScaled = true;
  using Element = int8_t;
  const int8_t* k;  // [num_pages, page_size, K, D]: value = int8 * scale
  const int8_t* v;
  const float* k_scales;  // [num_pages, page_size, K]
  const float* v_scales;
  static f32x16 load(const int8_t* p) { return load_i8(p); }
};

template <typename Pages>
struct Problem {
  const float* q;  // [T, H, D]
  Pages pages;
  const int32_t* positions;  // [T]
  const int32_t* page_table;  // [R, P]
  const int32_t* kv_lens;  // [R]
  float* out;  // [T, H, D]
  int64_t heads, kv_heads, head_dim, page_size, pages_per_row;
  float scale, softcap;
  int64_t window;

  // The slot (page, offset, KV head) where position j of row r keeps its K and V of KV head h,
  // for the `count` positions from j (one division, then a walk through the page table).
  void slots(int64_t r, int64_t j, int64_t h, int64_t count, int64_t* out) const {
    const int32_t* row_pages = page_table + r * pages_per_row + j / page_size;
    for (int64_t i = 0, offset = j % page_size; i < count; ++i, ++offset) {
      if (offset == page_size) offset = 0, ++row_pages;
      out[i] = (*row_pages * page_size + offset) * kv_heads + h;
    }
  }
};

// The positions token t of row r sees: [first, last] (empty when last < first).
struct Visible {
  int64_t first, last;
};

template <typename Pages>
Visible visible(const Problem<Pages>& p, int64_t r, int64_t t) {
  int64_t position = p.positions[t];
  int64_t last = std::min<int64_t>({position, p.kv_lens[r] - 1, p.pages_per_row * p.page_size - 1});
  int64_t first = p.window > 0 ? std::max<int64_t>(0, position - p.window + 1) : 0;
  return {first, last};
}

// Tokens [t0, t1) of row r against KV head h: every query head h * G + g of each token.
template <typename Pages>
void attend(const Problem<Pages>& p, int64_t r, int64_t t0, int64_t t1, int64_t h) {
  using Element = typename Pages::Element;
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
  const Element* keys[kLanes];
  const Element* values[kLanes];
  float key_scales[kLanes], value_scales[kLanes];
  for (int64_t j0 = first - first % kLanes; j0 <= last; j0 += kLanes) {
    int64_t block = std::min<int64_t>(kLanes, last + 1 - j0);
    int64_t slots[kLanes];
    p.slots(r, j0, h, block, slots);
    for (int64_t j = 0; j < block; ++j) {
      keys[j] = p.pages.k + slots[j] * d;
      values[j] = p.pages.v + slots[j] * d;
      if constexpr (Pages::kScaled) {
        key_scales[j] = p.pages.k_scales[slots[j]];
        value_scales[j] = p.pages.v_scales[slots[j]];
      }
    }
    // Lanes past the block repeat its last key so that the dot products below run over all 16 lanes
    // (a loop of fixed length keeps them in registers); their scores are masked.
    for (int64_t j = block; j < kLanes; ++j) {
      keys[j] = keys[block - 1];
      if constexpr (Pages::kScaled) key_scales[j] = value_scales[j] = 0.0f;
    }
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
          for (int64_t j = 0; j < kLanes; ++j) dots[j] += qc * Pages::load(keys[j] + c * kLanes);
        }
        f32x16 scores = sum_lanes_16(dots) * p.scale;
        if constexpr (Pages::kScaled) scores *= load_f32(key_scales);
        if (p.softcap > 0)
          for (int i = 0; i < kLanes; ++i) scores[i] = std::tanh(scores[i] / p.softcap) * p.softcap;
        scores = hidden ? kMasked : scores;
        float new_max = std::max(running_max[query], max_lanes(scores));
        float rescale = std::exp(running_max[query] - new_max);
        f32x16 probs = exp_lanes(scores - new_max);
        probs = hidden ? 0.0f : probs;
        running_max[query] = new_max;
        total[query] = total[query] * rescale + sum_lanes(probs);
        f32x16 weights = probs;
        if constexpr (Pages::kScaled) weights *= load_f32(value_scales);
        float* out = acc.data() + query * d;
        for (int64_t c = 0; c < chunks; ++c) {
          f32x16 o = load_f32(out + c * kLanes) * rescale;
          for (int64_t j = seen_from; j < seen_to; ++j) o += weights[j] * Pages::load(values[j] + c * kLanes);
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

template <typename Pages>
void attend_all(ffi::ThreadPool& pool, const Problem<Pages>& p, const int32_t* query_start, int64_t tokens, int64_t rows) {
  struct Unit {
    int64_t row, t0, t1;
  };
  std::vector<Unit> units;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t0 = query_start[r]; t0 < query_start[r + 1]; t0 += kTokensPerUnit)
      units.push_back({r, t0, std::min<int64_t>(query_start[r + 1], t0 + kTokensPerUnit)});
  int64_t padding = std::max<int64_t>(0, tokens - query_start[rows]), row_floats = p.heads * p.head_dim;
  std::memset(p.out + (tokens - padding) * row_floats, 0, padding * row_floats * sizeof(float));
  run_units(pool, int64_t(units.size()) * p.kv_heads, [&](int64_t unit) {
    const Unit& u = units[unit / p.kv_heads];
    attend(p, u.row, u.t0, u.t1, unit % p.kv_heads);
  });
}

template <typename Pages, typename PageBuffer>
ffi::Error Attention(ffi::ThreadPool& pool, Queries& q, PageBuffer& k_pages, Pages pages, Indices& positions,
                     Indices& query_start, Indices& kv_lens, PageTable& page_table, float scale, int64_t window,
                     float softcap, Outputs& out) {
  Problem<Pages> p{q.typed_data(), pages, positions.typed_data(), page_table.typed_data(), kv_lens.typed_data(),
                   out->typed_data(), q.dimensions()[1], k_pages.dimensions()[2], q.dimensions()[2],
                   k_pages.dimensions()[1], page_table.dimensions()[1], scale, softcap, window};
  attend_all(pool, p, query_start.typed_data(), q.dimensions()[0], page_table.dimensions()[0]);
  return ffi::Error::Success();
}

ffi::Error PagedAttentionFloat32(ffi::ThreadPool pool, Queries q, FloatPageBuffer k_pages, FloatPageBuffer v_pages, Indices positions,
                                 Indices query_start, Indices kv_lens, PageTable page_table, float scale,
                                 int64_t window, float softcap, Outputs out) {
  FloatPages pages{k_pages.typed_data(), v_pages.typed_data()};
  return Attention(pool, q, k_pages, pages, positions, query_start, kv_lens, page_table, scale, window, softcap, out);
}

ffi::Error PagedAttentionInt8(ffi::ThreadPool pool, Queries q, Int8PageBuffer k_pages, Int8PageBuffer v_pages,
                              Scales k_scales, Scales v_scales, Indices positions, Indices query_start,
                              Indices kv_lens, PageTable page_table, float scale, int64_t window, float softcap,
                              Outputs out) {
  Int8Pages pages{k_pages.typed_data(), v_pages.typed_data(), k_scales.typed_data(), v_scales.typed_data()};
  return Attention(pool, q, k_pages, pages, positions, query_start, kv_lens, page_table, scale, window, softcap, out);
}

// The arguments after the pages, the attributes and the result, the same for every page format.
template <typename Binding>
auto after_pages(Binding&& binding) {
  return std::move(binding)
      .template Arg<Indices>()
      .template Arg<Indices>()
      .template Arg<Indices>()
      .template Arg<PageTable>()
      .template Attr<float>("scale")
      .template Attr<int64_t>("window")
      .template Attr<float>("softcap")
      .template Ret<Queries>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_paged_attention_f32, PagedAttentionFloat32,
                              after_pages(ffi::Ffi::Bind()
                                              .Ctx<ffi::ThreadPool>()
                                              .Arg<Queries>()
                                              .Arg<FloatPageBuffer>()
                                              .Arg<FloatPageBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_paged_attention_int8, PagedAttentionInt8,
                              after_pages(ffi::Ffi::Bind()
                                              .Ctx<ffi::ThreadPool>()
                                              .Arg<Queries>()
                                              .Arg<Int8PageBuffer>()
                                              .Arg<Int8PageBuffer>()
                                              .Arg<Scales>()
                                              .Arg<Scales>()));
