// Scalar conversions between float32 and the storage types: the 16-bit floats (bit patterns
// in uint16_t) and the 8-bit KV formats (int8 and float8 e4m3fn, each with a float32 scale
// per token and kv head, applied by the caller).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace moelens {

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even; NaN stays NaN (quiet).
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float F16ToF32(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
}

inline uint16_t F32ToF16(float f) {
  _Float16 x = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

// float8 e4m3fn (OCP FP8, as ml_dtypes.float8_e4m3fn): 1 sign, 4 exponent (bias 7), 3
// mantissa bits; no infinities; 0x7f / 0xff are NaN; the largest finite value is 448.
constexpr float kF8E4M3Max = 448.f;

constexpr float F8E4M3Value(int code) {
  const int e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return __builtin_nanf("");
  float v = e == 0 ? float(m) / 8.f : 1.f + float(m) / 8.f;
  for (int i = 0; i < (e == 0 ? 6 : 7 - e); ++i) v /= 2.f;  // 2^(e - 7), or 2^-6 below
  for (int i = 0; i < e - 7; ++i) v *= 2.f;
  return (code & 0x80) ? -v : v;
}

struct F8E4M3Table {
  float v[256];
  constexpr F8E4M3Table() : v() {
    for (int c = 0; c < 256; ++c) v[c] = F8E4M3Value(c);
  }
};
// Decoding table (the portable kernel and `KvStore::Read` look codes up in it).
inline constexpr F8E4M3Table kF8E4M3{};

inline float F8E4M3ToF32(uint8_t b) { return kF8E4M3.v[b]; }

// Round to nearest, ties to even; magnitudes beyond 448 saturate to 448; NaN -> NaN.
inline uint8_t F32ToF8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const float a = std::fabs(f);
  if (a >= kF8E4M3Max) return sign | 0x7e;
  int lo = 0, hi = 0x7e;  // the positive codes are ascending in value
  while (lo < hi) {  // largest code with value <= a
    const int mid = (lo + hi + 1) / 2;
    if (kF8E4M3.v[mid] <= a) lo = mid; else hi = mid - 1;
  }
  const float below = kF8E4M3.v[lo], above = kF8E4M3.v[lo + 1];
  const float d0 = a - below, d1 = above - a;
  const int code = d0 < d1 ? lo : (d1 < d0 ? lo + 1 : (lo % 2 == 0 ? lo : lo + 1));
  return uint8_t(sign | code);
}

// max |x[i]| over n floats, and whether every x[i] is finite (the scale of a symmetric row
// quantisation: the KV store's 8-bit rows, the attention kernel's 16-bit queries).
inline float AbsMax(const float* x, int n, bool* finite) {
  float amax = 0.f;
  bool ok = true;
  for (int i = 0; i < n; ++i) {
    ok = ok && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  *finite = ok;
  return amax;
}

// int8 with a symmetric scale: round to nearest, ties to even, clamped to [-127, 127].
inline int8_t F32ToI8(float x) {
  if (std::isnan(x)) return 0;
  const float r = std::nearbyint(x);
  return int8_t(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
}

}  // namespace moelens
