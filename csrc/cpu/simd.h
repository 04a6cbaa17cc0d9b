// SIMD helpers of the CPU rasterizer (raster_common.h, rasterize.cpp, rasterize_bwd.cpp): kLanes
// pixels per vector through the GCC/Clang vector extension, so the compiler emits the widest SIMD the
// target has with no scalar tail; a few operations (any lane, lane sums, square roots) use AVX
// intrinsics where the target has them. Every helper rounds
// the same way each time it runs in one build, so a result never depends on which thread or member
// computed it.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace msplat_simd {

constexpr int64_t kLanes = 8;  // pixels per vector step (one AVX2 register of float32)

// kLanes values of scalar_t, its comparison masks (-1 / 0 per lane) and kLanes int32.
template <typename scalar_t>
struct Lanes {
  typedef scalar_t V __attribute__((vector_size(sizeof(scalar_t) * kLanes)));
  using M = decltype(V{} < V{});
};
typedef int32_t I8 __attribute__((vector_size(4 * kLanes)));
constexpr I8 kIota = {0, 1, 2, 3, 4, 5, 6, 7};
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte double lanes without AVX-512: inline only, no ABI

// x in every lane: a broadcast (x - 0 is x for every x, -0 included, so the subtraction folds away,
// where `V{} + x` would cost an addition: 0 + -0 is +0).
template <typename V>
inline V splat(typename std::remove_reference<decltype(V{}[0])>::type x) {
  return x - V{};
}

// a * b + c, fused (one rounding) where the target has FMA for this width, else two roundings. The
// build passes -ffp-contract=off, so only the expressions written with fmadd are fused.
template <typename V>
inline V fmadd(const V& a, const V& b, const V& c) {
#if defined(__FMA__) && !defined(MSPLAT_NO_FMA)
  if constexpr (sizeof(V) == 32 && std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(a[0])>>, float>)
    return reinterpret_cast<V>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#endif
  return a * b + c;
}

// True if any lane of a mask is set.
template <typename Mask>
inline bool any(const Mask& m) {
#if defined(__AVX__)
  if constexpr (sizeof(Mask) == 32) {
    const __m256i v = reinterpret_cast<__m256i>(m);
    return !_mm256_testz_si256(v, v);
  }
#endif
  bool out = false;
  for (int64_t l = 0; l < kLanes; ++l) out |= m[l] != 0;
  return out;
}

// Lanes set in a comparison mask of kLanes floats (popcount of its sign bits: scalar work, off the
// vector ports).
template <typename Mask>
inline int count_lanes(const Mask& m) {
#if defined(__AVX__)
  if constexpr (sizeof(Mask) == 32)
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(reinterpret_cast<__m256>(m))));
#endif
  int n = 0;
  for (int64_t l = 0; l < kLanes; ++l) n += m[l] != 0;
  return n;
}

// Square roots of kLanes floats (the vector form of std::sqrt: correctly rounded either way).
inline Lanes<float>::V sqrt_lanes(const Lanes<float>::V& x) {
#if defined(__AVX__)
  return reinterpret_cast<Lanes<float>::V>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#else
  Lanes<float>::V out;
  for (int64_t l = 0; l < kLanes; ++l) out[l] = std::sqrt(x[l]);
  return out;
#endif
}

// Natural log of kLanes floats (Cephes logf, within a few ulp: an absolute error below 1e-6 for
// x in [1e-30, 1e30]): -inf where x <= 0 or NaN, +inf where x is +inf. Denormal x give a large
// negative value (about -88), not the exact log.
__attribute__((always_inline)) inline Lanes<float>::V log_lanes(const Lanes<float>::V& x) {
  using V = Lanes<float>::V;
  const I8 bits = reinterpret_cast<const I8&>(x);
  V e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, V);
  const I8 mbits = (bits & 0x007fffff) | 0x3f000000;
  V m = reinterpret_cast<const V&>(mbits);  // x = m 2^e, m in [0.5, 1)
  const auto low = m < 0.70710678118654752f;
  e = low ? e - 1.0f : e;
  const V f = (low ? m + m : m) - 1.0f;
  const V z = f * f;
  V p = splat<V>(7.0376836292e-2f);
  p = fmadd(p, f, splat<V>(-1.1514610310e-1f));
  p = fmadd(p, f, splat<V>(1.1676998740e-1f));
  p = fmadd(p, f, splat<V>(-1.2420140846e-1f));
  p = fmadd(p, f, splat<V>(1.4249322787e-1f));
  p = fmadd(p, f, splat<V>(-1.6668057665e-1f));
  p = fmadd(p, f, splat<V>(2.0000714765e-1f));
  p = fmadd(p, f, splat<V>(-2.4999993993e-1f));
  p = fmadd(p, f, splat<V>(3.3333331174e-1f));
  V y = p * f * z;
  y = fmadd(e, splat<V>(-2.12194440e-4f), y);
  y = fmadd(z, splat<V>(-0.5f), y);
  V out = fmadd(e, splat<V>(0.693359375f), f + y);
  const V inf = splat<V>(__builtin_inff());
  out = x > 0.0f ? out : -inf;
  return x == inf ? inf : out;
}

// exp(-s), lane by lane, for s >= 0 (other lanes give garbage; the rasterizer masks them out).
// float: a Cephes-style polynomial (within 2 ulp of expf) in plain arithmetic, so every lane rounds
// alike; s > 87 and NaN give exp(-87), an alpha far below 1/255 for any opacity <= 1. double: std::exp.
inline void exp_neg(const Lanes<double>::V& s, Lanes<double>::V& out) {
  for (int64_t l = 0; l < kLanes; ++l) out[l] = std::exp(-s[l]);
}

inline void exp_neg(const Lanes<float>::V& s, Lanes<float>::V& out) {
  using V = Lanes<float>::V;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
#if defined(__AVX__)
  const V x = reinterpret_cast<V>(_mm256_max_ps(reinterpret_cast<__m256>(-s), _mm256_set1_ps(-87.0f)));  // NaN: -87
#else
  const V x = -s >= -87.0f ? -s : splat<V>(-87.0f);
#endif
  const V t = fmadd(x, splat<V>(1.44269504088896341f), splat<V>(kMagic));
  const V kf = t - kMagic;  // round(x / ln 2), in [-126, 0] for x in [-87, 0]
  V r = fmadd(kf, splat<V>(-0.693359375f), x);
  r = fmadd(kf, splat<V>(2.12194440e-4f), r);
  V p = splat<V>(1.9875691500e-4f);
  p = fmadd(p, r, splat<V>(1.3981999507e-3f));
  p = fmadd(p, r, splat<V>(8.3334519073e-3f));
  p = fmadd(p, r, splat<V>(4.1665795894e-2f));
  p = fmadd(p, r, splat<V>(1.6666665459e-1f));
  p = fmadd(p, r, splat<V>(5.0000001201e-1f));
  const V y = fmadd(p, r * r, r) + 1.0f;
  // 2^kf: t's low mantissa bits hold kf (plus a multiple of 2^9 that the shift drops).
  const I8 bits = (reinterpret_cast<const I8&>(t) + 127) << 23;
  out = y * reinterpret_cast<const V&>(bits);
}

// Sum of the lanes of v, always as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
template <typename V>
inline auto lane_sum(const V& v) -> std::remove_cv_t<std::remove_reference_t<decltype(v[0])>> {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// dst[j] += lane_sum(g[j]) for j < 8, the lanes added in lane_sum's order.
template <typename V, typename scalar_t>
inline void add_lane_sums8(const V* g, scalar_t* dst) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32 && std::is_same_v<scalar_t, float>) {
    const auto m = [&](int j) { return reinterpret_cast<__m256>(g[j]); };
    const __m256 t0 = _mm256_hadd_ps(m(0), m(1)), t1 = _mm256_hadd_ps(m(2), m(3));
    const __m256 t2 = _mm256_hadd_ps(m(4), m(5)), t3 = _mm256_hadd_ps(m(6), m(7));
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // halves' sums
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), sums));
    return;
  }
#endif
  for (int j = 0; j < 8; ++j) dst[j] += lane_sum(g[j]);
}

}  // namespace msplat_simd
