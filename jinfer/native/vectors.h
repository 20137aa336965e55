// Shared by jinfer's CPU kernels: 16-lane float32 vectors (GCC vector extensions, mapped to the
// machine's widest vectors by -march=native), loads that widen int8 / uint8 into them, and the split
// of a kernel's work over XLA's intra-op thread pool.

#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || defined(__AVXVNNI__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jinfer {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));
typedef int8_t i8x32 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline f32x16 load_f32(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_f32(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

inline u8x16 load_u8(const uint8_t* p) {
  u8x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline u8x32 load_u8x32(const uint8_t* p) {
  u8x32 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline i8x32 load_i8x32(const int8_t* p) {
  i8x32 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x16 widen_u8(u8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }

#if defined(__AVX512F__)
inline f32x16 load_i8(const int8_t* p) {
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
// Signed bytes widen through unsigned ones (q + 128): GCC vectorises the zero extension of a byte
// vector but not its sign extension.
inline f32x16 load_i8(const int8_t* p) { return widen_u8(load_u8(reinterpret_cast<const uint8_t*>(p)) ^ 0x80) - 128.0f; }
#endif

inline float sum_lanes(f32x16 v) {
  f32x8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline float sum_lanes(f32x8 v) {
  f32x4 q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// Lane l: acc[l] plus the sum of a[4l + t] * b[4l + t] over t < 4 (unsigned times signed bytes,
// exact in int32).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline i32x8 dot_u8_i8(i32x8 acc, u8x32 a, i8x32 b) { return (i32x8)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)a, (__m256i)b); }
#elif defined(__AVXVNNI__)
inline i32x8 dot_u8_i8(i32x8 acc, u8x32 a, i8x32 b) { return (i32x8)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)a, (__m256i)b); }
#else
inline i32x8 dot_u8_i8(i32x8 acc, u8x32 a, i8x32 b) {
  typedef int32_t i32x32 __attribute__((vector_size(128)));
  i32x32 p = __builtin_convertvector(a, i32x32) * __builtin_convertvector(b, i32x32);
  return acc + __builtin_shufflevector(p, p, 0, 4, 8, 12, 16, 20, 24, 28) + __builtin_shufflevector(p, p, 1, 5, 9, 13, 17, 21, 25, 29) +
         __builtin_shufflevector(p, p, 2, 6, 10, 14, 18, 22, 26, 30) + __builtin_shufflevector(p, p, 3, 7, 11, 15, 19, 23, 27, 31);
}
#endif

// exp of every lane: 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor
// series to r^7 (relative error ~1e-7). Lanes below -87 give ~0.
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

// Units of work handed out by an atomic counter to the calling thread and to tasks on the pool.
// The caller takes units until none is left, then waits only for units already taken, so it never
// waits on a task that has not started; late tasks find nothing to do.
struct Units {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
  std::function<void(int64_t)> body;
  void drain() {
    for (int64_t unit; (unit = next.fetch_add(1)) < count;) {
      body(unit);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs body(0) ... body(count - 1) on the calling thread and the pool's threads; returns when all are done.
inline void run_units(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
  auto units = std::make_shared<Units>();
  units->count = count;
  units->body = std::move(body);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([units] { units->drain(); });
  units->drain();
  while (units->done.load(std::memory_order_acquire) < units->count) std::this_thread::yield();
}

}  // namespace jinfer
