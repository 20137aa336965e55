// int4 weights in panels of 8 rows times activations rounded to 8 bits (quantize="w4a8") or 16 bits
// ("w4a16") per block of 32 columns, for XLA:CPU, registered as XLA FFI targets
// (jinfer/native/library.py).
//
// y[M, N] = round(x)[M, K] . w[N, K]^T. x is rounded to int8 per block of 32 columns, a scale of
// max|block| / 127 each; for 16 bits, what that leaves is rounded to a second int8 part in steps 254
// times finer (jinfer.ops.matmul.round_activation_blocks is the XLA reference of both). w is int4
// with a scale and a min per row and group of columns (w = q * scale + min), in the panel layout of
// jinfer/quantize.py (`interleave_panels`): each panel of 8 weight rows holds, for every chunk of 4
// columns of the first half of K, the 4 bytes of row 0, then row 1, ... row 7; a byte's low nibble
// is its column of the first half, its high nibble the same column of the second half. Scales and
// mins are interleaved alike ([group][row] per panel).
//
// One 32-byte load thus gives, in its low nibbles, 4 columns of 8 weight rows, and vpdpbusd
// (AVX-512 VNNI) multiplies them by the same 4 activations broadcast to every lane, adding into an
// int32 lane per weight row: a block of 32 columns is 8 such steps per half (per int8 part), after
// which each lane holds a row's exact integer dot product and is scaled once, 8 rows at a time. The
// high nibbles are multiplied in place (byte & 0xF0, sixteen times the nibble), the 1/16 folded into
// their scale. No sums across lanes, and about a tenth of an instruction per weight (w4a8; w4a16
// twice the products): decode streams the weights at memory speed, and prefill multiplies 4
// products per lane and instruction.
//
// A tile is 2 panels (16 weight rows) by up to 4 rows of x (2 for w4a16); tiles of one panel where
// N / 8 is odd. Work is split over XLA's intra-op thread pool in units of kPanelsPerUnit panels.
// Needs N % 8 == 0, K % 64 == 0 and groups of a multiple of 32 columns: jinfer/native/matmul.py
// checks before calling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jinfer;

namespace {

using FloatMatrix = ffi::Buffer<ffi::F32, 2>;
using ByteMatrix = ffi::Buffer<ffi::U8, 2>;
using FloatResult = ffi::ResultBuffer<ffi::F32, 2>;

constexpr int64_t kBlock = 32;        // columns of x sharing one scale: jinfer.quantize.ACTIVATION_BLOCK
constexpr int64_t kPanelRows = 8;     // weight rows per panel: the int32 lanes of a 256-bit vector
constexpr int64_t kChunk = 4;         // columns per byte lane group of vpdpbusd
constexpr int kPanelsPerTile = 2;
constexpr int64_t kPanelsPerUnit = 4;
constexpr float kFineSteps = 254.0f;  // steps of the second int8 part per step of the first (|fine| <= 127): jinfer.ops.matmul.FINE_STEPS

// x rounded per block: the int8 values [M, K] (Parts = 2: coarse values and the fine values of
// what the coarse leave, in steps of 1/254 of theirs), each block's step [M, K / 32] (Parts = 2:
// the fine step), and each weight group's sum of rounded activations [M, groups].
template <int Parts>
struct RoundedActivations {
  std::vector<int8_t> values[Parts];
  std::vector<float> scales, group_sums;
};

// Rounds to the nearest integer, ties to even, as jnp.round does (|v| <= 127 here).
inline f32x16 round_lanes(f32x16 v) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23
  return (v + kRound) - kRound;
}

inline void store_i8(int8_t* out, f32x16 low, f32x16 high) {
  for (int l = 0; l < kLanes; ++l) out[l] = static_cast<int8_t>(low[l]), out[kLanes + l] = static_cast<int8_t>(high[l]);
}

template <int Parts>
RoundedActivations<Parts> round_activations(const float* x, int64_t m, int64_t k, int64_t groups) {
  int64_t blocks = k / kBlock, blocks_per_group = blocks / groups;
  RoundedActivations<Parts> r;
  for (auto& values : r.values) values.resize(m * k);
  r.scales.resize(m * blocks);
  r.group_sums.assign(m * groups, 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* block = x + i * k + b * kBlock;
      f32x16 first = load_f32(block), second = load_f32(block + kLanes);
      f32x16 a = first < 0 ? -first : first, c = second < 0 ? -second : second;
      f32x16 largest = a > c ? a : c;
      float scale = 0.0f;
      for (int l = 0; l < kLanes; ++l) scale = std::max(scale, largest[l]);
      scale /= 127.0f;
      float divisor = scale == 0.0f ? 1.0f : scale;
      if (!std::isfinite(sum_lanes(first + second))) {  // a NaN or infinity: NaN products, as in the reference
        scale = NAN;
        first = second = f32x16{};
      }
      f32x16 v_low = first / divisor, v_high = second / divisor;
      f32x16 low = round_lanes(v_low), high = round_lanes(v_high);
      store_i8(r.values[0].data() + i * k + b * kBlock, low, high);
      if constexpr (Parts == 2) {
        // v - round(v) is exact, so the fine part rounds the same wherever it is computed.
        f32x16 fine_low = round_lanes((v_low - low) * kFineSteps), fine_high = round_lanes((v_high - high) * kFineSteps);
        store_i8(r.values[1].data() + i * k + b * kBlock, fine_low, fine_high);
        low = low * kFineSteps + fine_low;
        high = high * kFineSteps + fine_high;
        scale /= kFineSteps;
      }
      r.scales[i * blocks + b] = scale;
      r.group_sums[i * groups + b / blocks_per_group] += scale * sum_lanes(low + high);
    }
  return r;
}

template <int Parts>
struct Problem {
  const uint8_t* packed;  // [N, K / 2], in panels of 8 rows
  const float* scales;    // [N, groups], in panels of 8 rows
  const float* mins;      // [N, groups], in panels of 8 rows
  const RoundedActivations<Parts>* x;
  float* y;               // [M, N]
  int64_t m, k, n, groups;
};

inline i32x8 broadcast_chunk(const int8_t* x) {
  int32_t chunk;
  std::memcpy(&chunk, x, sizeof chunk);
  return i32x8{} + chunk;
}

inline f32x8 load_f32x8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// y[m0 : m0 + MB, 8 * panel0 : 8 * (panel0 + NP)].
template <int Parts, int MB, int NP>
void tile(const Problem<Parts>& p, int64_t m0, int64_t panel0) {
  int64_t half = p.k / 2, blocks = p.k / kBlock, half_blocks = blocks / 2, group_blocks = blocks / p.groups;
  int64_t panel_bytes = half * kPanelRows, panel_floats = p.groups * kPanelRows;
  const uint8_t* panels = p.packed + panel0 * panel_bytes;
  const float* scales = p.scales + panel0 * panel_floats;
  const int8_t* xs[Parts][MB];
  const float* x_scales[MB];
  for (int i = 0; i < MB; ++i) {
    for (int part = 0; part < Parts; ++part) xs[part][i] = p.x->values[part].data() + (m0 + i) * p.k;
    x_scales[i] = p.x->scales.data() + (m0 + i) * blocks;
  }
  f32x8 acc[MB][NP] = {};
  for (int64_t b = 0; b < half_blocks; ++b) {
    i32x8 low[Parts][MB][NP] = {}, high[Parts][MB][NP] = {};
    for (int64_t chunk = 0; chunk < kBlock / kChunk; ++chunk) {
      int64_t col = b * kBlock + chunk * kChunk;
      u8x32 low_nibbles[NP], high_nibbles[NP];
      for (int j = 0; j < NP; ++j) {
        const uint8_t* bytes = panels + j * panel_bytes + col * kPanelRows;
        u8x32 v = load_u8x32(bytes);
        low_nibbles[j] = v & 0x0F;
        high_nibbles[j] = v & 0xF0;
        __builtin_prefetch(bytes + NP * panel_bytes);
      }
      for (int part = 0; part < Parts; ++part)
        for (int i = 0; i < MB; ++i) {
          i32x8 x_low = broadcast_chunk(xs[part][i] + col), x_high = broadcast_chunk(xs[part][i] + half + col);
          for (int j = 0; j < NP; ++j) {
            low[part][i][j] = dot_u8_i8(low[part][i][j], low_nibbles[j], (i8x32)x_low);
            high[part][i][j] = dot_u8_i8(high[part][i][j], high_nibbles[j], (i8x32)x_high);
          }
        }
    }
    if constexpr (Parts == 2) {  // in fine steps: coarse * 254 + fine (|sum| < 2^28, exact in int32)
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NP; ++j) {
          low[0][i][j] = low[0][i][j] * static_cast<int32_t>(kFineSteps) + low[1][i][j];
          high[0][i][j] = high[0][i][j] * static_cast<int32_t>(kFineSteps) + high[1][i][j];
        }
    }
    int64_t group_low = b / group_blocks, group_high = (b + half_blocks) / group_blocks;
    for (int j = 0; j < NP; ++j) {
      f32x8 scale_low = load_f32x8(scales + j * panel_floats + group_low * kPanelRows);
      f32x8 scale_high = load_f32x8(scales + j * panel_floats + group_high * kPanelRows) * (1.0f / 16);
      for (int i = 0; i < MB; ++i)
        acc[i][j] += __builtin_convertvector(low[0][i][j], f32x8) * (scale_low * x_scales[i][b]) +
                     __builtin_convertvector(high[0][i][j], f32x8) * (scale_high * x_scales[i][b + half_blocks]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    const float* sums = p.x->group_sums.data() + (m0 + i) * p.groups;
    for (int j = 0; j < NP; ++j) {
      const float* mins = p.mins + (panel0 + j) * panel_floats;
      f32x8 out = acc[i][j];
      for (int64_t g = 0; g < p.groups; ++g) out += load_f32x8(mins + g * kPanelRows) * sums[g];
      std::memcpy(p.y + (m0 + i) * p.n + (panel0 + j) * kPanelRows, &out, sizeof out);
    }
  }
}

// Every row of x against NP panels from panel0, in tiles of up to 4 / Parts rows (the int32 sums
// of a tile fill 16 registers).
template <int Parts, int NP>
void panel_rows(const Problem<Parts>& p, int64_t panel0) {
  constexpr int kRows = 4 / Parts;
  int64_t i = 0;
  for (; i + kRows <= p.m; i += kRows) tile<Parts, kRows, NP>(p, i, panel0);
  switch (p.m - i) {
    case 3: return tile<Parts, 3, NP>(p, i, panel0);
    case 2: return tile<Parts, 2, NP>(p, i, panel0);
    case 1: return tile<Parts, 1, NP>(p, i, panel0);
  }
}

template <int Parts>
ffi::Error Matmul(ffi::ThreadPool pool, FloatMatrix x, ByteMatrix packed, FloatMatrix scales, FloatMatrix mins,
                  FloatResult y) {
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = packed.dimensions()[0], groups = scales.dimensions()[1];
  RoundedActivations<Parts> rounded = round_activations<Parts>(x.typed_data(), m, k, groups);
  Problem<Parts> p{packed.typed_data(), scales.typed_data(), mins.typed_data(), &rounded, y->typed_data(), m, k, n, groups};
  int64_t panels = n / kPanelRows;
  run_units(pool, (panels + kPanelsPerUnit - 1) / kPanelsPerUnit, [&p, panels](int64_t unit) {
    int64_t panel = unit * kPanelsPerUnit, end = std::min(panels, panel + kPanelsPerUnit);
    for (; panel + kPanelsPerTile <= end; panel += kPanelsPerTile) panel_rows<Parts, kPanelsPerTile>(p, panel);
    if (panel < end) panel_rows<Parts, 1>(p, panel);
  });
  return ffi::Error::Success();
}

// x, packed weights, scales, mins -> y.
auto binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<FloatMatrix>().Arg<ByteMatrix>().Arg<FloatMatrix>().Arg<FloatMatrix>().Ret<FloatMatrix>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_matmul_w4a8, Matmul<1>, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_matmul_w4a16, Matmul<2>, binding());
