// Shared parts of the CPU rasterizer's forward (rasterize.cpp) and backward (rasterize_bwd.cpp): input
// checks, the tile gather with its reach boxes and per-vector row lists, and the compositing step both
// passes take, so that they make the same decisions bit for bit.
//
// The specification is ms_splatfacto/backend/kernels/reference.py (gsplat 1.4.0 semantics,
// unpacked mode): same compositing thresholds and output layouts.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace msplat_raster {

constexpr double kAlphaMin = 1.0 / 255.0;  // a Gaussian below this alpha is skipped at a pixel
constexpr double kAlphaMax = 0.999;        // alpha is clamped to this
constexpr double kTMin = 1e-4;             // stop before transmittance would reach this or below

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

// Inputs of the rasterizer, validated and made contiguous.
struct RasterInputs {
  at::Tensor means2d, conics, colors, opacities, backgrounds, offsets, flatten_ids;
  int64_t C, N, D, tile_width, tile_height, M;
};
inline RasterInputs check_raster_inputs(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors,
                                 const at::Tensor& opacities, const std::optional<at::Tensor>& backgrounds,
                                 int64_t width, int64_t height, int64_t tile_size, const at::Tensor& isect_offsets,
                                 const at::Tensor& flatten_ids) {
  check_cpu(means2d, "means2d");
  check_cpu(conics, "conics");
  check_cpu(colors, "colors");
  check_cpu(opacities, "opacities");
  check_cpu(isect_offsets, "isect_offsets");
  check_cpu(flatten_ids, "flatten_ids");
  TORCH_CHECK(colors.dim() == 3, "colors must be [C, N, D], got ", colors.sizes());
  RasterInputs in;
  in.C = colors.size(0), in.N = colors.size(1), in.D = colors.size(2);
  const int64_t C = in.C, N = in.N, D = in.D;
  TORCH_CHECK(means2d.sizes() == at::IntArrayRef({C, N, 2}), "means2d must be [C, N, 2] = [", C, ", ", N,
              ", 2], got ", means2d.sizes());
  TORCH_CHECK(conics.sizes() == at::IntArrayRef({C, N, 3}), "conics must be [C, N, 3] = [", C, ", ", N,
              ", 3], got ", conics.sizes());
  TORCH_CHECK(opacities.sizes() == at::IntArrayRef({C, N}), "opacities must be [C, N] = [", C, ", ", N, "], got ",
              opacities.sizes());
  const auto dtype = means2d.scalar_type();
  TORCH_CHECK(conics.scalar_type() == dtype && colors.scalar_type() == dtype && opacities.scalar_type() == dtype,
              "means2d, conics, colors and opacities must share a dtype");
  TORCH_CHECK(isect_offsets.dim() == 3 && isect_offsets.size(0) == C, "isect_offsets must be [C, tile_height, ",
              "tile_width] with C = ", C, ", got ", isect_offsets.sizes());
  TORCH_CHECK(isect_offsets.scalar_type() == at::kInt, "isect_offsets must be int32");
  TORCH_CHECK(flatten_ids.dim() == 1 && flatten_ids.scalar_type() == at::kInt, "flatten_ids must be [M] int32");
  TORCH_CHECK(width >= 0 && height >= 0 && tile_size > 0, "bad image size ", width, "x", height, " or tile size ",
              tile_size);
  in.tile_height = isect_offsets.size(1), in.tile_width = isect_offsets.size(2);
  TORCH_CHECK(in.tile_width * tile_size >= width && in.tile_height * tile_size >= height, "a ", in.tile_width, "x",
              in.tile_height, " grid of ", tile_size, "-pixel tiles does not cover a ", width, "x", height, " image");
  if (backgrounds.has_value()) {
    check_cpu(*backgrounds, "backgrounds");
    TORCH_CHECK(backgrounds->sizes() == at::IntArrayRef({C, D}), "backgrounds must be [C, D] = [", C, ", ", D,
                "], got ", backgrounds->sizes());
    TORCH_CHECK(backgrounds->scalar_type() == dtype, "backgrounds must have the colours' dtype");
    in.backgrounds = backgrounds->detach().contiguous();
  }
  in.M = flatten_ids.size(0);
  if (in.M > 0) {
    const auto [lo, hi] = at::aminmax(flatten_ids);
    TORCH_CHECK(lo.item<int32_t>() >= 0 && hi.item<int64_t>() < C * N, "flatten_ids must lie in [0, C * N)");
  }
  if (isect_offsets.numel() > 0) {
    const auto [lo, hi] = at::aminmax(isect_offsets);
    TORCH_CHECK(lo.item<int32_t>() >= 0 && hi.item<int64_t>() <= in.M, "isect_offsets must lie in [0, M]");
  }
  in.means2d = means2d.detach().contiguous();
  in.conics = conics.detach().contiguous();
  in.colors = colors.detach().contiguous();
  in.opacities = opacities.detach().contiguous();
  in.offsets = isect_offsets.contiguous();
  in.flatten_ids = flatten_ids.contiguous();
  return in;
}

using msplat_simd::any;
using msplat_simd::fmadd;
using msplat_simd::I8;
using msplat_simd::kIota;
using msplat_simd::kLanes;
using msplat_simd::Lanes;
using msplat_simd::splat;

// A tile's Gaussians gathered into rows {mean x, mean y, conic a, b, c, opacity, sigma_cut, colour[D]},
// so the per-pixel loops read contiguous memory. Where sigma > sigma_cut = log(255 opacity) (widened
// by 0.1 % + 1e-3, well beyond the float log and exp's rounding), alpha < 1/255.
constexpr int64_t kRowHead = 7;

// Tile t (flattened over cameras): its camera, pixel rectangle [x0, x1) x [y0, y1) clipped to the
// image, and its range [start, end) in the sorted intersections.
struct TileWork {
  int64_t cam, x0, y0, x1, y1, start, end;
  bool empty() const { return x0 >= x1 || y0 >= y1; }
};

inline TileWork tile_work(const int32_t* offsets, int64_t t, int64_t n_tiles, int64_t n_total_tiles, int64_t tw,
                          int64_t tile_size, int64_t width, int64_t height, int64_t M) {
  const int64_t tile = t % n_tiles, x0 = (tile % tw) * tile_size, y0 = (tile / tw) * tile_size;
  const int64_t start = offsets[t];
  const int64_t end = std::max<int64_t>(t + 1 < n_total_tiles ? offsets[t + 1] : M, start);
  return {t / n_tiles, x0, y0, std::min(x0 + tile_size, width), std::min(y0 + tile_size, height), start, end};
}

// Conservative boxes around the ellipses 0.5 d^T Q d <= t, t = log(255 opacity), outside which a
// Gaussian's alpha is below 1/255, for kLanes rows at once: half-widths sqrt(2 t (Q^-1)_xx) and
// sqrt(2 t (Q^-1)_yy). Every pixel outside the box is one the reference skips, so the box only saves
// work. It is widened so that rounding cannot break that: sigma as computed in scalar_t can be off by
// about 12 eps cond(Q) relative (cancellation in elongated conics), so t grows by 16 eps cond(Q) +
// 0.1 % (cond(Q) bounded by trace^2 / det; where that exceeds 50 %, or the conic is not positive
// definite, or inputs are NaN, the box is unbounded), and the half-widths by 1 % plus 0.01 px plus the
// rounding of the mean. The float log (log_lanes) and square roots (relative error below 1e-6) are
// covered by the same margins. Returns the pixels [xs, xe) x [ys, ye) of the tile whose centres may lie
// in the box, with one pixel of slack (the sweep's alpha test decides; NaN bounds give the whole tile),
// and writes each row's sigma_cut (row[6]). Branch-free: the bounds are data.
template <typename scalar_t>
inline void reach_spans(scalar_t* rows, int64_t stride, const TileWork& w, I8& xs, I8& xe, I8& ys, I8& ye) {
  // In halves of 4 lanes: wider double vectors than the target's registers are compared lane by lane.
  typedef double D4 __attribute__((vector_size(32)));
  typedef float F4 __attribute__((vector_size(16)));
  typedef int32_t I4 __attribute__((vector_size(16)));
  using VF = Lanes<float>::V;
  VF op;
  for (int64_t l = 0; l < kLanes; ++l) op[l] = static_cast<float>(rows[l * stride + 5]);
  const VF lg = msplat_simd::log_lanes(255.0f * op);
  const VF t_f = lg > 0.0f ? lg : VF{};
  const double inf = std::numeric_limits<double>::infinity();
  const double eps = std::numeric_limits<scalar_t>::epsilon();
  for (int64_t half = 0; half < 2; ++half) {
    D4 mx, my, a, b, c, lgd, t;
    for (int64_t j = 0; j < 4; ++j) {
      const scalar_t* r = rows + (4 * half + j) * stride;
      mx[j] = r[0], my[j] = r[1], a[j] = r[2], b[j] = r[3], c[j] = r[4];
      lgd[j] = lg[4 * half + j], t[j] = t_f[4 * half + j];
    }
    const D4 cut = lgd * 1.001 + 1e-3;
    for (int64_t j = 0; j < 4; ++j) rows[(4 * half + j) * stride + 6] = static_cast<scalar_t>(cut[j]);
    const D4 det = a * c - b * b, inv_det = 1.0 / det;
    const D4 rel = 16.0 * eps * ((a + c) * (a + c) * inv_det) + 1e-3;
    const auto ok = (a > 0.0) & (c > 0.0) & (det > 0.0) & (t < inf) & (rel < 0.5);
    const D4 scale = 2.0 * (t * (1.0 + rel) + 1e-3) * inv_det;
    const D4 slack = 0.01 + 4.0 * eps * ((mx < 0.0 ? -mx : mx) + (my < 0.0 ? -my : my));
    const auto root = [](const D4& x) {
      F4 f = __builtin_convertvector(x, F4);
#if defined(__AVX__)
      f = reinterpret_cast<F4>(_mm_sqrt_ps(reinterpret_cast<__m128>(f)));
#else
      for (int j = 0; j < 4; ++j) f[j] = std::sqrt(f[j]);
#endif
      return __builtin_convertvector(f, D4);
    };
    const D4 none = D4{} + inf;
    const D4 ex = ok ? root(scale * c) * 1.01 + slack : none, ey = ok ? root(scale * a) * 1.01 + slack : none;
    const auto span = [&](const D4& lo, const D4& hi, int64_t s0, int64_t s1, I8& s, I8& e) {
      const D4 fa = D4{} + double(s0), fb = D4{} + double(s1);
      D4 fs = lo - 0.5, fe = hi - 0.5;
#if defined(__AVX__)
      fs = reinterpret_cast<D4>(_mm256_floor_pd(reinterpret_cast<__m256d>(fs)));
      fe = reinterpret_cast<D4>(_mm256_ceil_pd(reinterpret_cast<__m256d>(fe)));
#else
      for (int j = 0; j < 4; ++j) fs[j] = std::floor(fs[j]), fe[j] = std::ceil(fe[j]);
#endif
      fe += 1.0;
      fs = fs > fa ? fs : fa, fs = fs < fb ? fs : fb;  // NaN: s0
      fe = fe < fb ? fe : fb, fe = fe > fa ? fe : fa;  // NaN: s1
      const I4 si = __builtin_convertvector(fs, I4), ei = __builtin_convertvector(fe, I4);
      for (int j = 0; j < 4; ++j) s[4 * half + j] = si[j], e[4 * half + j] = ei[j];
    };
    span(mx - ex, mx + ex, w.x0, w.x1, xs, xe);
    span(my - ey, my + ey, w.y0, w.y1, ys, ye);
  }
}

// 64-byte aligned storage (vector types are over-aligned).
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
};
template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

// Per-thread state of one tile, sized once per thread (no allocation per tile or pixel). The tile's
// pixels are cut into vectors of kLanes along its rows (vpr per row, the last one padded); vector v
// covers row v / vpr, columns (v % vpr) * kLanes + [0, kLanes). masks[(v / 32) * len_pad + k] has
// bit v % 32 set where Gaussian row k's reach box meets vector v (len_pad: len rounded up to 32, the
// padding rows meet nothing). The hit_* arrays hold one vector's composited Gaussians (backward).
template <typename scalar_t>
struct TileScratch {
  using V = typename Lanes<scalar_t>::V;
  using M = typename Lanes<scalar_t>::M;
  int64_t vpr = 0, nv = 0, len_pad = 0;
  std::vector<scalar_t> rows;
  std::vector<uint32_t> masks;
  AlignedVector<V> acc;  // runtime-D accumulators
  std::vector<int32_t> hit_k;
  AlignedVector<M> hit_h;
  AlignedVector<V> hit_vis, hit_T;

  // Gathers rows [start, start + len) of the sorted intersections (the Gaussians are scattered in
  // memory: a few rows are fetched early) and marks the vectors each one's reach box meets.
  void gather(const RasterInputs& in, const TileWork& w, int64_t start, int64_t len) {
    const int64_t D = in.D, stride = kRowHead + D;
    const scalar_t* m = in.means2d.data_ptr<scalar_t>();
    const scalar_t* q = in.conics.data_ptr<scalar_t>();
    const scalar_t* col = in.colors.data_ptr<scalar_t>();
    const scalar_t* op = in.opacities.data_ptr<scalar_t>();
    const int32_t* ids = in.flatten_ids.data_ptr<int32_t>();
    vpr = (w.x1 - w.x0 + kLanes - 1) / kLanes;
    nv = vpr * (w.y1 - w.y0);
    len_pad = (len + 31) / 32 * 32;
    const int64_t len8 = (len + kLanes - 1) / kLanes * kLanes;  // reach_spans takes kLanes rows at once
    rows.resize(len8 * stride);
    std::fill(rows.begin() + len * stride, rows.end(), scalar_t(0));
    masks.assign((nv + 31) / 32 * len_pad, 0u);
    uint64_t every_row = 0;  // bit y * vpr for each row y (used where nv <= 32)
    for (int64_t y = 0; y * vpr < 64 && y < w.y1 - w.y0; ++y) every_row |= 1ull << (y * vpr);
    constexpr int64_t ahead = 16;
    for (int64_t k = 0; k < len; ++k) {
      if (k + ahead < len) {
        const int64_t f = ids[start + k + ahead];
        __builtin_prefetch(&m[2 * f]), __builtin_prefetch(&q[3 * f]), __builtin_prefetch(&op[f]);
        __builtin_prefetch(&col[D * f]);
      }
      const int64_t g = ids[start + k];
      scalar_t* r = &rows[k * stride];
      r[0] = m[2 * g], r[1] = m[2 * g + 1];
      r[2] = q[3 * g], r[3] = q[3 * g + 1], r[4] = q[3 * g + 2];
      r[5] = op[g];
      for (int64_t d = 0; d < D; ++d) r[kRowHead + d] = col[D * g + d];
    }
    for (int64_t k0 = 0; k0 < len; k0 += kLanes) {
      I8 xs8, xe8, ys8, ye8;
      reach_spans(&rows[k0 * stride], stride, w, xs8, xe8, ys8, ye8);
      for (int64_t l = 0; l < kLanes && k0 + l < len; ++l) {
        const int64_t k = k0 + l, xs = xs8[l], xe = xe8[l], ys = ys8[l], ye = ye8[l];
        if (xs >= xe || ys >= ye) continue;
        const int64_t vs = (xs - w.x0) / kLanes, ve = (xe - w.x0 + kLanes - 1) / kLanes;
        if (nv <= 32) {  // one word: rows' bits (one every vpr) times the row's run of vectors, no loop
          const uint64_t rows_set = (~0ull << ((ys - w.y0) * vpr)) & ~(~0ull << ((ye - w.y0) * vpr - 1) << 1);
          masks[k] = static_cast<uint32_t>((rows_set & every_row) * ((1ull << ve) - (1ull << vs)));
          continue;
        }
        uint32_t word = 0;  // bits of mask word `at` (vectors come in increasing order)
        int64_t at = -1;
        for (int64_t y = ys - w.y0; y < ye - w.y0; ++y)
          for (int64_t v = y * vpr + vs; v < y * vpr + ve; ++v) {
            if ((v >> 5) != at) {
              if (at >= 0) masks[at * len_pad + k] |= word;
              at = v >> 5, word = 0;
            }
            word |= 1u << (v & 31);
          }
        masks[at * len_pad + k] |= word;
      }
    }
  }

  // Bits j of the result: row k0 + j meets vector v, for j < 32 (k0 a multiple of 32).
  uint32_t meets(int64_t v, int64_t k0) const {
    const uint32_t* mw = &masks[(v >> 5) * len_pad + k0];
    const uint32_t bit = 1u << (v & 31);
#if defined(__AVX2__)
    const __m256i b = _mm256_set1_epi32(static_cast<int>(bit));
    uint32_t out = 0;
    for (int j = 0; j < 4; ++j) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mw + 8 * j));
      const __m256i hit = _mm256_cmpeq_epi32(_mm256_and_si256(x, b), b);
      out |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(hit))) << (8 * j);
    }
    return out;
#else
    uint32_t out = 0;
    for (int j = 0; j < 32; ++j) out |= uint32_t((mw[j] & bit) != 0) << j;
    return out;
#endif
  }
};

// One vector of a tile's pixels: centres px (per lane) and py, lanes that are pixels of the image.
template <typename scalar_t>
struct PixelVector {
  typename Lanes<scalar_t>::V px;
  scalar_t py;
  typename Lanes<scalar_t>::M inside;
  int64_t y, x;  // first pixel
  PixelVector(const TileWork& w, int64_t vpr, int64_t v) {
    using V = typename Lanes<scalar_t>::V;
    using M = typename Lanes<scalar_t>::M;
    y = w.y0 + v / vpr, x = w.x0 + (v % vpr) * kLanes;
    px = __builtin_convertvector(kIota + static_cast<int32_t>(x), V) + scalar_t(0.5);
    py = static_cast<scalar_t>(y) + scalar_t(0.5);
    inside = __builtin_convertvector(kIota + static_cast<int32_t>(x) < static_cast<int32_t>(w.x1), M);
  }
};

// Evaluations the kernels performed: {forward pairs, forward lanes, backward pairs, backward lanes}.
// A pair is a Gaussian evaluated at a still-compositing pixel of its reach box's span of vectors; lanes
// count every SIMD lane composited, padding and finished pixels included. A vector where no lane is
// within sigma_cut (nothing can composite: the forward's filter, the backward's skip) is in neither.
inline std::atomic<int64_t> g_counts[4];

// Adds the lanes set in a mask (-1 each) to a per-lane tally.
template <typename M>
inline void tally(I8& counter, const M& m) {
  counter += __builtin_convertvector(m, I8);
}

inline int64_t tally_total(const I8& counter) {
  int64_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total -= counter[l];
  return total;
}

// The rows of mask word k0 (rows k0 .. k0 + 31) that vector v walks: those whose reach box meets it
// and where some lane of `alive` is within sigma_cut (elsewhere alpha < 1/255 at every lane: nothing
// composites and nothing ends), in order, into kept[0..n), with the exponent at the vector in sig[i]
// (rounded as gsplat computes it); returns n. Kept without a branch (the test is data: a branch on it
// mispredicts), so the rows that follow composite in a loop of their own.
template <typename scalar_t>
inline int kept_rows(const TileScratch<scalar_t>& s, int64_t stride, const PixelVector<scalar_t>& pv, int64_t v,
                     int64_t k0, const typename Lanes<scalar_t>::M& alive, typename Lanes<scalar_t>::V* sig,
                     int32_t* kept) {
  using V = typename Lanes<scalar_t>::V;
  int n = 0;
  for (uint32_t bits = s.meets(v, k0); bits; bits &= bits - 1) {
    const int32_t k = static_cast<int32_t>(k0 + __builtin_ctz(bits));
    const scalar_t* r = &s.rows[k * stride];
    const scalar_t dy = r[1] - pv.py;
    const V dx = r[0] - pv.px;
    sig[n] = scalar_t(0.5) * (r[2] * (dx * dx) + r[4] * (dy * dy)) + r[3] * dx * dy;
    kept[n] = k;
    n += any(alive & (sig[n] <= r[6]));
  }
  return n;
}

// Gaussian row r at a vector of pixels, one front-to-back compositing step from its exponent sigma:
// lanes still alive and `open` (before their limit) that pass the alpha test composite (h) unless the
// transmittance would fall to 1e-4 or below, which ends them. Forward and backward both call this, so
// they take the same decisions bit for bit; and each pixel meets its Gaussians in list order, as in
// gsplat's walk.
template <typename scalar_t>
struct Step {
  using V = typename Lanes<scalar_t>::V;
  using M = typename Lanes<scalar_t>::M;
  V vis, alpha, T_before;
  M h;

  inline void composite(const V& sigma, scalar_t opacity, const M& open, V& T, M& alive) {
    const scalar_t t_min = static_cast<scalar_t>(kTMin), a_min = static_cast<scalar_t>(kAlphaMin);
    const scalar_t a_max = static_cast<scalar_t>(kAlphaMax);
    msplat_simd::exp_neg(sigma, vis);
    const V raw = opacity * vis;
    alpha = raw > a_max ? splat<V>(a_max) : raw;
    T_before = T;
    const V next_T = T_before * (scalar_t(1) - alpha);
    const M live = alive & open;
    const M ok = live & (sigma >= scalar_t(0)) & (alpha >= a_min);
    h = ok & (next_T > t_min);
    alive = live ^ (ok ^ h);  // ends where ok and not h (transmittance floor), or at the limit
    T = h ? next_T : T_before;
  }
};

}  // namespace msplat_raster
