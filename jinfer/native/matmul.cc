// Matrix products with few rows for XLA:CPU, registered as XLA FFI targets (jinfer/native/library.py).
//
// y[M, N] = x[M, K] . w[N, K]^T with w float32, int8 (a scale per row and group of columns) or
// int4 (half-split nibbles, a scale and an offset per row and group), accumulated in float32.
// Decode multiplies a handful of rows by every weight once per token, so the weights are read
// once. Two forms:
// - dot products (every format; float32 below kPackedMinRows rows of x): tiles of 4 weight rows stay
//   in L1 while every row of x passes over them, 16-lane partial sums per (row of x, weight row)
//   summed across lanes at the end;
// - outer products (float32 from kPackedMinRows rows): a unit's weight rows are transposed, a block
//   of columns at a time, into panels of 16 outputs per column, and tiles of up to 8 rows of x add
//   x[i, k] * panel[k] into accumulators that are pieces of rows of y. Packing costs a 16x16
//   transpose per 256 weights, which pays from about 20 rows of x on two threads, summed over a
//   SmolLM2 layer's products (measured; on one thread from about 12).
// Work is split over XLA's intra-op thread pool in units of kRowsPerUnit weight rows (dot products)
// or kPackedUnitRows (outer products).
//
// Written with GCC vector extensions (16 float32 lanes), which the compiler maps to the machine's
// widest vectors (-march=native); AVX-512 intrinsics only where GCC's code for an extension is slow
// (widening int8). Weight rows one tile ahead are prefetched: a tile's rows are short streams that
// the hardware prefetcher picks up too late (measured: int8 at half speed without). Needs
// K % 16 == 0 (int4: K % 32 == 0) and groups of a multiple of 16 columns: jinfer/native/matmul.py
// checks before calling.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jinfer;

namespace {

using FloatMatrix = ffi::Buffer<ffi::F32, 2>;
using Int8Matrix = ffi::Buffer<ffi::S8, 2>;
using ByteMatrix = ffi::Buffer<ffi::U8, 2>;
using FloatResult = ffi::ResultBuffer<ffi::F32, 2>;

constexpr int64_t kRowsPerUnit = 32;
constexpr int kWeightRowsPerTile = 4;
constexpr int kPackedRows = 8;              // rows of x per tile of the outer-product form
constexpr int kPanels = 3;                  // panels of kLanes weight rows per unit of the outer-product form
constexpr int64_t kPackedUnitRows = kPanels * kLanes;
constexpr int64_t kPrefetchTiles = 4;       // tiles of rows of x that prefetch the next unit, a line per column
constexpr int64_t kPackedColumns = 128;     // columns of K per packed block of the outer-product form
constexpr int64_t kRunsPerThread = 8;       // runs of consecutive units per thread of the outer-product form
constexpr int64_t kPackedMinRows = 20;      // rows of x from which float32 takes the outer-product form

// Weight formats: where a weight row starts, and 16 of its columns as float32 lanes.
struct Float32Weights {
  static constexpr bool kGrouped = false;
  const float* w;
  int64_t k;
  const float* row(int64_t n) const { return w + n * k; }
  f32x16 load(const float* row, int64_t col) const { return load_f32(row + col); }
  const void* address(int64_t n, int64_t col) const { return w + n * k + col; }
};

struct Int8Weights {  // w = q * scale
  static constexpr bool kGrouped = true;
  static constexpr bool kOffset = false;
  static constexpr bool kHalfSplit = false;
  const int8_t* q;
  const float* scales;  // [N, groups]
  int64_t k, groups;
  const int8_t* row(int64_t n) const { return q + n * k; }
  f32x16 load(const int8_t* row, int64_t col) const { return load_i8(row + col); }
  void load_both(const int8_t*, int64_t, f32x16&, f32x16&) const {}
  const void* address(int64_t n, int64_t col) const { return q + n * k + col; }
  float scale(int64_t n, int64_t g) const { return scales[n * groups + g]; }
};

struct Int4Weights {  // w = q * scale + offset; byte j holds column j (low nibble) and j + K/2 (high)
  static constexpr bool kGrouped = true;
  static constexpr bool kOffset = true;
  static constexpr bool kHalfSplit = true;
  const uint8_t* packed;
  const float* scales;  // [N, groups]
  const float* mins;    // [N, groups], or null: symmetric, offset = -8 * scale
  int64_t k, groups;
  const uint8_t* row(int64_t n) const { return packed + n * (k / 2); }
  f32x16 load(const uint8_t* row, int64_t col) const {
    int64_t half = k / 2;
    return col < half ? widen_u8(load_u8(row + col) & 15) : widen_u8(load_u8(row + col - half) >> 4);
  }
  // Columns col and col + K/2, for col in the first half.
  void load_both(const uint8_t* row, int64_t col, f32x16& low, f32x16& high) const {
    u8x16 bytes = load_u8(row + col);
    low = widen_u8(bytes & 15);
    high = widen_u8(bytes >> 4);
  }
  const void* address(int64_t n, int64_t col) const { return row(n) + (col < k / 2 ? col : col - k / 2); }
  float scale(int64_t n, int64_t g) const { return scales[n * groups + g]; }
  // sum over groups g of offset(n, g) * sums[g], the offset being min, or -8 * scale when symmetric.
  float offset_sum(int64_t n, const float* sums) const {
    const float* offsets = (mins ? mins : scales) + n * groups;
    f32x16 acc = {};
    int64_t g = 0;
    for (; g + kLanes <= groups; g += kLanes) acc += load_f32(offsets + g) * load_f32(sums + g);
    float total = sum_lanes(acc);
    for (; g < groups; ++g) total += offsets[g] * sums[g];
    return mins ? total : -8.0f * total;
  }
};

struct Problem {
  const float* x;          // [M, K]
  float* y;                // [M, N]
  const float* group_sums; // [M, groups]: sums of x over each group (offset formats)
  int64_t m, k, n, groups;
};

// y[m0 : m0 + MB, n0 : n0 + NB] from a pass over NB weight rows.
template <int MB, int NB, typename Weights>
void tile(const Weights& weights, const Problem& p, int64_t m0, int64_t n0) {
  decltype(weights.row(0)) rows[NB];
  for (int j = 0; j < NB; ++j) rows[j] = weights.row(n0 + j);
  const float* xs[MB];
  for (int i = 0; i < MB; ++i) xs[i] = p.x + (m0 + i) * p.k;
  float out[MB][NB];
  if constexpr (!Weights::kGrouped) {
    f32x16 acc[MB][NB] = {};
    for (int64_t col = 0; col < p.k; col += kLanes) {
      f32x16 w[NB];
      for (int j = 0; j < NB; ++j) w[j] = weights.load(rows[j], col);
      for (int j = 0; j < NB; ++j) __builtin_prefetch(weights.address(n0 + NB + j, col));
      for (int i = 0; i < MB; ++i) {
        f32x16 x = load_f32(xs[i] + col);
        for (int j = 0; j < NB; ++j) acc[i][j] += x * w[j];
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) out[i][j] = sum_lanes(acc[i][j]);
  } else {
    f32x16 acc[MB][NB] = {};
    int64_t group = p.k / p.groups, half = p.k / 2;
    if (Weights::kHalfSplit && half % group == 0) {
      // Each byte holds a column of each half: one load feeds two groups, half the groups apart.
      for (int64_t g = 0; g < p.groups / 2; ++g) {
        f32x16 low[MB][NB] = {}, high[MB][NB] = {};
        for (int64_t col = g * group; col < (g + 1) * group; col += kLanes) {
          f32x16 wl[NB], wh[NB];
          for (int j = 0; j < NB; ++j) weights.load_both(rows[j], col, wl[j], wh[j]);
          for (int j = 0; j < NB; ++j) __builtin_prefetch(weights.address(n0 + NB + j, col));
          for (int i = 0; i < MB; ++i) {
            f32x16 xl = load_f32(xs[i] + col), xh = load_f32(xs[i] + col + half);
            for (int j = 0; j < NB; ++j) {
              low[i][j] += xl * wl[j];
              high[i][j] += xh * wh[j];
            }
          }
        }
        for (int j = 0; j < NB; ++j) {
          float scale_low = weights.scale(n0 + j, g), scale_high = weights.scale(n0 + j, g + p.groups / 2);
          for (int i = 0; i < MB; ++i) acc[i][j] += low[i][j] * scale_low + high[i][j] * scale_high;
        }
      }
    } else {
      for (int64_t g = 0; g < p.groups; ++g) {
        f32x16 part[MB][NB] = {};
        for (int64_t col = g * group; col < (g + 1) * group; col += kLanes) {
          f32x16 w[NB];
          for (int j = 0; j < NB; ++j) w[j] = weights.load(rows[j], col);
          for (int j = 0; j < NB; ++j) __builtin_prefetch(weights.address(n0 + NB + j, col));
          for (int i = 0; i < MB; ++i) {
            f32x16 x = load_f32(xs[i] + col);
            for (int j = 0; j < NB; ++j) part[i][j] += x * w[j];
          }
        }
        for (int j = 0; j < NB; ++j) {
          float scale = weights.scale(n0 + j, g);
          for (int i = 0; i < MB; ++i) acc[i][j] += part[i][j] * scale;
        }
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) out[i][j] = sum_lanes(acc[i][j]);
    if constexpr (Weights::kOffset) {
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) out[i][j] += weights.offset_sum(n0 + j, p.group_sums + (m0 + i) * p.groups);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) p.y[(m0 + i) * p.n + n0 + j] = out[i][j];
}

// All M rows of x against NB weight rows, in tiles of up to kRows rows of x (fewer for grouped
// formats, whose per-group partial sums double the accumulators held in registers).
template <int NB, typename Weights>
void weight_rows(const Weights& weights, const Problem& p, int64_t n0) {
  constexpr int kRows = Weights::kGrouped ? 2 : 4;
  int64_t i = 0;
  for (; i + kRows <= p.m; i += kRows) tile<kRows, NB>(weights, p, i, n0);
  if constexpr (kRows == 4) {
    if (p.m - i == 3) tile<3, NB>(weights, p, i, n0);
    if (p.m - i == 2) tile<2, NB>(weights, p, i, n0);
  }
  if (p.m - i == 1) tile<1, NB>(weights, p, i, n0);
}

template <typename Weights>
void matmul(ffi::ThreadPool& pool, const Weights& weights, const Problem& p) {
  run_units(pool, (p.n + kRowsPerUnit - 1) / kRowsPerUnit, [&weights, &p](int64_t unit) {
    int64_t n0 = unit * kRowsPerUnit, end = std::min(p.n, n0 + kRowsPerUnit);
    for (; n0 + kWeightRowsPerTile <= end; n0 += kWeightRowsPerTile) weight_rows<kWeightRowsPerTile>(weights, p, n0);
    for (; n0 < end; ++n0) weight_rows<1>(weights, p, n0);
  });
}

// Outer-product form for float32 weights and enough rows of x. A unit's weight rows are packed, a
// block of kPackedColumns columns at a time, into kPanels panels of kLanes rows laid out
// [column][kLanes]: column k of a panel is one vector of kLanes outputs. A tile of up to 8 rows of x
// then adds x[i, k] * panel[k] into one accumulator per (row, panel) for every k (8 x 3 = 24
// accumulators, 3 panel loads and 8 broadcasts of x per 24 products), and its accumulators are pieces
// of rows of y: no sums across lanes. The panels of a block stay in L1 while every row of x passes
// over them, and the next unit's weights (contiguous rows) are prefetched while this one is
// multiplied, a share per block.

// The transpose of 16 vectors (v[r][l] -> v[l][r]) in four stages; the stage of bit D swaps bit D of
// the vector index with bit D of the lane index, by two-source shuffles (vpermt2ps on AVX-512).
#define JINFER_LOW(l) (((l) & D) ? (l) + 16 - D : (l))
#define JINFER_HIGH(l) (((l) & D) ? (l) + 16 : (l) + D)
template <int D>
inline void transpose_stage(f32x16* v) {
  for (int r = 0; r < 16; ++r) {
    if (r & D) continue;
    f32x16 a = v[r], b = v[r + D];
    v[r] = __builtin_shufflevector(a, b, JINFER_LOW(0), JINFER_LOW(1), JINFER_LOW(2), JINFER_LOW(3), JINFER_LOW(4),
                                   JINFER_LOW(5), JINFER_LOW(6), JINFER_LOW(7), JINFER_LOW(8), JINFER_LOW(9), JINFER_LOW(10),
                                   JINFER_LOW(11), JINFER_LOW(12), JINFER_LOW(13), JINFER_LOW(14), JINFER_LOW(15));
    v[r + D] = __builtin_shufflevector(a, b, JINFER_HIGH(0), JINFER_HIGH(1), JINFER_HIGH(2), JINFER_HIGH(3), JINFER_HIGH(4),
                                       JINFER_HIGH(5), JINFER_HIGH(6), JINFER_HIGH(7), JINFER_HIGH(8), JINFER_HIGH(9),
                                       JINFER_HIGH(10), JINFER_HIGH(11), JINFER_HIGH(12), JINFER_HIGH(13), JINFER_HIGH(14),
                                       JINFER_HIGH(15));
  }
}
#undef JINFER_LOW
#undef JINFER_HIGH

// Columns [col0, col0 + cols) of weight rows w[0 : rows] (rows <= kLanes; the rest read as zeros)
// as a panel [cols][kLanes].
void pack_panel(const float* w, int64_t k, int64_t rows, int64_t col0, int64_t cols, f32x16* panel) {
  for (int64_t col = 0; col < cols; col += kLanes) {
    f32x16 v[kLanes];
    for (int r = 0; r < kLanes; ++r) v[r] = r < rows ? load_f32(w + r * k + col0 + col) : f32x16{};
    transpose_stage<8>(v);
    transpose_stage<4>(v);
    transpose_stage<2>(v);
    transpose_stage<1>(v);
    for (int c = 0; c < kLanes; ++c) panel[col + c] = v[c];
  }
}

// y[m0 : m0 + MB, n0 : n0 + outputs] (outputs <= NP * kLanes) plus the products of columns
// [col0, col0 + cols) from NP panels of kPackedColumns vectors; the first block (col0 = 0) sets y.
// Each column also prefetches one line of the next unit's weights (prefetch[col]).
template <int MB, int NP>
void packed_tile(const f32x16* panels, const Problem& p, int64_t m0, int64_t n0, int64_t outputs, int64_t col0,
                 int64_t cols, const float* const* prefetch) {
  const float* x = p.x + m0 * p.k + col0;
  f32x16 acc[MB][NP] = {};
  for (int64_t col = 0; col < cols; ++col) {
    __builtin_prefetch(prefetch[col]);
    f32x16 w[NP];
    for (int j = 0; j < NP; ++j) w[j] = panels[j * kPackedColumns + col];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NP; ++j) acc[i][j] += x[i * p.k + col] * w[j];
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NP; ++j) {
      float* y = p.y + (m0 + i) * p.n + n0 + j * kLanes;
      int64_t count = std::min<int64_t>(kLanes, outputs - j * kLanes);
      if (count == kLanes) {
        store_f32(y, col0 ? acc[i][j] + load_f32(y) : acc[i][j]);
      } else {
        for (int64_t l = 0; l < count; ++l) y[l] = col0 ? y[l] + acc[i][j][l] : acc[i][j][l];
      }
    }
}

// The tile of `rows` rows of x from m0 (1 <= rows <= MB).
template <int NP, int MB = kPackedRows>
void packed_tile_of(int64_t rows, const f32x16* panels, const Problem& p, int64_t m0, int64_t n0, int64_t outputs,
                    int64_t col0, int64_t cols, const float* const* prefetch) {
  if constexpr (MB > 1) {
    if (rows < MB) return packed_tile_of<NP, MB - 1>(rows, panels, p, m0, n0, outputs, col0, cols, prefetch);
  }
  packed_tile<MB, NP>(panels, p, m0, n0, outputs, col0, cols, prefetch);
}

// All M rows of x against NP panels, in as few tiles of at most kPackedRows rows as there can be,
// of sizes that differ by at most one (10 rows: 5 + 5, not 8 + 2); tile t prefetches the lines
// prefetch[t % kPrefetchTiles * cols ...].
template <int NP>
void packed_rows(const f32x16* panels, const Problem& p, int64_t n0, int64_t outputs, int64_t col0, int64_t cols,
                 const float* const* prefetch) {
  int64_t tiles = (p.m + kPackedRows - 1) / kPackedRows;
  for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
    int64_t rows = (p.m - m0) / (tiles - t);
    packed_tile_of<NP>(rows, panels, p, m0, n0, outputs, col0, cols, prefetch + t % kPrefetchTiles * cols);
    m0 += rows;
  }
}

// Weight rows [n0, n0 + kPackedUnitRows) of the outer-product form.
void packed_unit(const float* w, const Problem& p, int64_t n0) {
  struct Buffers {
    alignas(64) f32x16 packed[kPanels * kPackedColumns];
    const float* prefetch[kPrefetchTiles * kPackedColumns];
  };
  static_assert(kPackedUnitRows * kPackedColumns / kLanes <= kPrefetchTiles * kPackedColumns, "a block's share of the next unit's lines fits the list");
  static thread_local Buffers buffers;
  f32x16* packed = buffers.packed;
  const float** prefetch = buffers.prefetch;
  int64_t rows = std::min(p.n - n0, kPackedUnitRows), panels = (rows + kLanes - 1) / kLanes;
  int64_t tiles = std::min<int64_t>(kPrefetchTiles, (p.m + kPackedRows - 1) / kPackedRows);
  for (int64_t col0 = 0; col0 < p.k; col0 += kPackedColumns) {
    int64_t cols = std::min(kPackedColumns, p.k - col0);
    for (int64_t j = 0; j < panels; ++j)
      pack_panel(w + (n0 + j * kLanes) * p.k, p.k, std::min(kLanes, rows - j * kLanes), col0, cols,
                 packed + j * kPackedColumns);
    // The next unit's weights are contiguous: its lines, a share per block of this unit, one per
    // column multiplied (the rest at once); past the last, the packed block (in L1 already).
    int64_t blocks = (p.k + kPackedColumns - 1) / kPackedColumns, block = col0 / kPackedColumns;
    int64_t next_rows = std::max<int64_t>(0, std::min(p.n - n0 - kPackedUnitRows, kPackedUnitRows));
    int64_t lines = next_rows * p.k / kLanes, share = (lines + blocks - 1) / blocks;
    int64_t first = std::min(lines, block * share), count = std::min(lines, first + share) - first;
    const float* next = w + (n0 + kPackedUnitRows) * p.k + first * kLanes;
    for (int64_t q = 0; q < count; ++q) prefetch[q] = next + q * kLanes;
    for (int64_t q = tiles * cols; q < count; ++q) __builtin_prefetch(prefetch[q]);
    for (; count < tiles * cols; ++count) prefetch[count] = reinterpret_cast<const float*>(packed);
    if (panels == 3)
      packed_rows<3>(packed, p, n0, rows, col0, cols, prefetch);
    else if (panels == 2)
      packed_rows<2>(packed, p, n0, rows, col0, cols, prefetch);
    else
      packed_rows<1>(packed, p, n0, rows, col0, cols, prefetch);
  }
}

// Units are taken in runs of consecutive ones (about kRunsPerThread runs per thread), so that the
// unit a unit prefetches is mostly taken by the same thread.
void matmul_packed(ffi::ThreadPool& pool, const float* w, const Problem& p) {
  int64_t units = (p.n + kPackedUnitRows - 1) / kPackedUnitRows;
  int64_t per = std::max<int64_t>(1, units / (kRunsPerThread * std::max<int64_t>(1, pool.num_threads())));
  run_units(pool, (units + per - 1) / per, [w, &p, units, per](int64_t group) {
    for (int64_t unit = group * per; unit < std::min(units, (group + 1) * per); ++unit) packed_unit(w, p, unit * kPackedUnitRows);
  });
}

std::vector<float> group_sums(const float* x, int64_t m, int64_t k, int64_t groups) {
  std::vector<float> sums(m * groups);
  int64_t group = k / groups;  // a multiple of kLanes
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      f32x16 acc = {};
      for (int64_t col = g * group; col < (g + 1) * group; col += kLanes) acc += load_f32(x + i * k + col);
      sums[i * groups + g] = sum_lanes(acc);
    }
  return sums;
}

ffi::Error MatmulFloat32(ffi::ThreadPool pool, FloatMatrix x, FloatMatrix w, FloatResult y) {
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  Problem p{x.typed_data(), y->typed_data(), nullptr, m, k, n, 1};
  if (m >= kPackedMinRows)
    matmul_packed(pool, w.typed_data(), p);
  else
    matmul(pool, Float32Weights{w.typed_data(), k}, p);
  return ffi::Error::Success();
}

ffi::Error MatmulInt8(ffi::ThreadPool pool, FloatMatrix x, Int8Matrix q, FloatMatrix scales,
                      FloatResult y) {
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = q.dimensions()[0], groups = scales.dimensions()[1];
  Problem p{x.typed_data(), y->typed_data(), nullptr, m, k, n, groups};
  matmul(pool, Int8Weights{q.typed_data(), scales.typed_data(), k, groups}, p);
  return ffi::Error::Success();
}

ffi::Error Int4(ffi::ThreadPool& pool, FloatMatrix& x, ByteMatrix& packed, FloatMatrix& scales,
                const float* mins, FloatResult& y) {
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = packed.dimensions()[0], groups = scales.dimensions()[1];
  std::vector<float> sums = group_sums(x.typed_data(), m, k, groups);
  Problem p{x.typed_data(), y->typed_data(), sums.data(), m, k, n, groups};
  matmul(pool, Int4Weights{packed.typed_data(), scales.typed_data(), mins, k, groups}, p);
  return ffi::Error::Success();
}

ffi::Error MatmulInt4(ffi::ThreadPool pool, FloatMatrix x, ByteMatrix packed, FloatMatrix scales,
                      FloatMatrix mins, FloatResult y) {
  return Int4(pool, x, packed, scales, mins.typed_data(), y);
}

ffi::Error MatmulInt4Symmetric(ffi::ThreadPool pool, FloatMatrix x, ByteMatrix packed,
                               FloatMatrix scales, FloatResult y) {
  return Int4(pool, x, packed, scales, nullptr, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_matmul_f32, MatmulFloat32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<FloatMatrix>()
                                  .Arg<FloatMatrix>()
                                  .Ret<FloatMatrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_matmul_int8, MatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<FloatMatrix>()
                                  .Arg<Int8Matrix>()
                                  .Arg<FloatMatrix>()
                                  .Ret<FloatMatrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_matmul_int4, MatmulInt4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<FloatMatrix>()
                                  .Arg<ByteMatrix>()
                                  .Arg<FloatMatrix>()
                                  .Arg<FloatMatrix>()
                                  .Ret<FloatMatrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_matmul_int4_symmetric, MatmulInt4Symmetric,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<FloatMatrix>()
                                  .Arg<ByteMatrix>()
                                  .Arg<FloatMatrix>()
                                  .Ret<FloatMatrix>());
