// What greedy sampling and the sampled token's logprob need from each row of logits, in one pass
// over the row for the maximum and its first index and one for the sum of exponentials, registered
// as an XLA FFI target (jinfer/native/library.py). XLA:CPU runs these as three reductions over the
// whole [B, V] logits (~5% of a batch-32 SmolLM2 decode step). Rows are split over the thread pool.
// A row holding a NaN gives NaN for the maximum and the normalizer and V - 1 for the index, as the
// jnp formulas in jinfer/sampling.py do.

#include <cmath>
#include <cstdint>
#include <limits>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jinfer;

namespace {

using Logits = ffi::Buffer<ffi::F32, 2>;  // [B, V]
using FloatRows = ffi::Buffer<ffi::F32, 1>;  // [B]
using IndexRows = ffi::Buffer<ffi::S32, 1>;  // [B]

void row_stats(const float* logits, int64_t vocab, float* best, int32_t* index, float* normalizer) {
  const f32x16 lane_ids = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t whole = vocab - vocab % kLanes;  // columns in whole vectors; the rest one at a time
  f32x16 top = f32x16{} - std::numeric_limits<float>::infinity(), top_at = {};
  i32x16 nans = {};
  for (int64_t c = 0; c < whole; c += kLanes) {
    f32x16 v = load_f32(logits + c);
    auto greater = v > top;  // strictly: each lane keeps the first index of its maximum
    top = greater ? v : top;
    top_at = greater ? lane_ids + float(c) : top_at;
    nans |= v != v;
  }
  bool has_nan = false;
  for (int i = 0; i < kLanes; ++i) has_nan |= nans[i] != 0;
  float maximum = -std::numeric_limits<float>::infinity(), first = float(vocab - 1);
  for (int i = 0; i < kLanes && whole > 0; ++i)
    if (top[i] > maximum || (top[i] == maximum && top_at[i] < first)) maximum = top[i], first = top_at[i];
  for (int64_t c = whole; c < vocab; ++c) {
    has_nan |= logits[c] != logits[c];
    if (logits[c] > maximum) maximum = logits[c], first = float(c);
  }
  if (has_nan) {
    *best = *normalizer = std::numeric_limits<float>::quiet_NaN();
    *index = int32_t(vocab - 1);
    return;
  }
  f32x16 sums = {};
  for (int64_t c = 0; c < whole; c += kLanes) sums += exp_lanes(load_f32(logits + c) - maximum);
  float total = sum_lanes(sums);
  for (int64_t c = whole; c < vocab; ++c) total += std::exp(logits[c] - maximum);
  *best = maximum;
  *index = int32_t(first);
  *normalizer = maximum + std::log(total);
}

ffi::Error LogitStats(ffi::ThreadPool pool, Logits logits, ffi::ResultBuffer<ffi::F32, 1> best,
                      ffi::ResultBuffer<ffi::S32, 1> index, ffi::ResultBuffer<ffi::F32, 1> normalizer) {
  const int64_t rows = logits.dimensions()[0], vocab = logits.dimensions()[1];
  const float* data = logits.typed_data();
  run_units(pool, rows, [&](int64_t r) {
    row_stats(data + r * vocab, vocab, best->typed_data() + r, index->typed_data() + r, normalizer->typed_data() + r);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_logit_stats, LogitStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Logits>()
                                  .Ret<FloatRows>()
                                  .Ret<IndexRows>()
                                  .Ret<FloatRows>());
