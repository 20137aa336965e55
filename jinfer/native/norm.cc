// RMS normalization for XLA:CPU, registered as an XLA FFI target (jinfer/native/library.py):
// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * (offset + scale), in float32, what `RMSNorm` in
// jinfer/models/layers.py computes. XLA splits each small normalization into a reduction and a
// multiply, each handed to its thread pool: ~60 us for a [32, 576] step against ~2 us here, on the
// calling thread. Needs a feature count that is a multiple of 16: jinfer/native/norm.py checks.

#include <cmath>
#include <cstdint>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jinfer;

namespace {

using Rows = ffi::Buffer<ffi::F32, 2>;  // [T, D]
using Scale = ffi::Buffer<ffi::F32, 1>;  // [D]

ffi::Error RmsNorm(Rows x, Scale scale, float eps, float offset, ffi::ResultBuffer<ffi::F32, 2> y) {
  const int64_t rows = x.dimensions()[0], features = x.dimensions()[1];
  const float* in = x.typed_data();
  const float* weights = scale.typed_data();
  float* out = y->typed_data();
  for (int64_t t = 0; t < rows; ++t, in += features, out += features) {
    f32x16 squares = {};
    for (int64_t c = 0; c < features; c += kLanes) {
      f32x16 v = load_f32(in + c);
      squares += v * v;
    }
    float inverse_rms = 1.0f / std::sqrt(sum_lanes(squares) / float(features) + eps);
    for (int64_t c = 0; c < features; c += kLanes)
      store_f32(out + c, load_f32(in + c) * inverse_rms * (offset + load_f32(weights + c)));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jinfer_rms_norm, RmsNorm,
                              ffi::Ffi::Bind()
                                  .Arg<Rows>()
                                  .Arg<Scale>()
                                  .Attr<float>("eps")
                                  .Attr<float>("offset")
                                  .Ret<Rows>());
