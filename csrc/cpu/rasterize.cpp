// Tile-based alpha compositing of projected Gaussians on the CPU (OpenMP, SIMD over pixels); the
// tile lists come from isect.cpp.
//
// The specification is ms_splatfacto/backend/kernels/reference.py (gsplat 1.4.0 semantics,
// unpacked mode): same compositing thresholds and output layouts. Gradients are hand-written; see
// rasterize_to_pixels_bwd below.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;  // a Gaussian below this alpha is skipped at a pixel
constexpr double kAlphaMax = 0.999;        // alpha is clamped to this
constexpr double kTMin = 1e-4;             // stop before transmittance would reach this or below

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

// Inputs of the rasterizer, validated and made contiguous.
struct RasterInputs {
  at::Tensor means2d, conics, colors, opacities, backgrounds, offsets, flatten_ids;
  int64_t C, N, D, tile_width, tile_height, M;
};

RasterInputs check_raster_inputs(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors,
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

// Conservative box around the ellipse 0.5 d^T Q d <= t, t = log(255 opacity), outside which the
// Gaussian's alpha is below 1/255: half-widths sqrt(2 t (Q^-1)_xx) and sqrt(2 t (Q^-1)_yy). Every
// pixel outside the box is one the reference skips, so the box only saves work. It is widened so
// that rounding cannot break that: sigma as computed in scalar_t can be off by about
// 12 eps cond(Q) relative (cancellation in elongated conics), so t grows by 16 eps cond(Q) + 0.1 %
// (cond(Q) bounded by trace^2 / det; where that exceeds 50 %, or the conic is not positive definite,
// or inputs are NaN, the box is unbounded), and the half-widths by 1 % plus 0.01 px plus the rounding
// of the mean. The float log and square roots (relative error below 1e-6) are covered by the same
// margins. Returns {x_lo, x_hi, y_lo, y_hi}.
template <typename scalar_t>
inline void reach_box(const scalar_t* r, double* box) {
  const double a = r[2], b = r[3], c = r[4], det = a * c - b * b;
  const double t = std::max(0.0f, std::log(255.0f * float(r[5])));
  const double inf = std::numeric_limits<double>::infinity();
  const double eps = std::numeric_limits<scalar_t>::epsilon();
  double ex = inf, ey = inf;
  if (a > 0 && c > 0 && det > 0 && t < inf) {
    const double inv_det = 1.0 / det, rel = 16.0 * eps * ((a + c) * (a + c) * inv_det) + 1e-3;
    if (rel < 0.5) {
      const double scale = 2.0 * (t * (1.0 + rel) + 1e-3) * inv_det;
      const double slack = 0.01 + 4.0 * eps * (std::abs(double(r[0])) + std::abs(double(r[1])));
      ex = std::sqrt(float(scale * c)) * 1.01 + slack;
      ey = std::sqrt(float(scale * a)) * 1.01 + slack;
    }
  }
  box[0] = double(r[0]) - ex, box[1] = double(r[0]) + ex, box[2] = double(r[1]) - ey, box[3] = double(r[1]) + ey;
}

// Pixels [s, e) within [a, b) whose centre x + 0.5 may lie in [lo, hi], with one pixel of slack
// (the box is only a shortcut; the sweep's alpha test decides). NaN bounds give the whole range.
// Written as min / max (no branches: the bounds are data).
inline void pixel_span(double lo, double hi, int64_t a, int64_t b, int64_t& s, int64_t& e) {
  const double fa = double(a), fb = double(b);
  double fs = std::floor(lo - 0.5), fe = std::ceil(hi - 0.5) + 1.0;
  fs = fs > fa ? fs : fa, fs = fs < fb ? fs : fb;  // NaN: a
  fe = fe < fb ? fe : fb, fe = fe > fa ? fe : fa;  // NaN: b
  s = int64_t(fs), e = int64_t(fe);
}

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
    rows.resize(len * stride);
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
      r[6] = static_cast<scalar_t>(double(std::log(255.0f * float(r[5]))) * 1.001 + 1e-3);
      for (int64_t d = 0; d < D; ++d) r[kRowHead + d] = col[D * g + d];
      double box[4];
      reach_box(r, box);
      int64_t xs, xe, ys, ye;
      pixel_span(box[0], box[1], w.x0, w.x1, xs, xe);
      pixel_span(box[2], box[3], w.y0, w.y1, ys, ye);
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

// Calls f(k) for each row k < len whose reach box meets vector v, in order, while f returns true.
template <typename scalar_t, typename F>
inline void for_each_row(const TileScratch<scalar_t>& s, int64_t v, F&& f) {
  for (int64_t k0 = 0; k0 < s.len_pad; k0 += 32)
    for (uint32_t bits = s.meets(v, k0); bits; bits &= bits - 1)
      if (!f(static_cast<int32_t>(k0 + __builtin_ctz(bits)))) return;
}

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
// count every SIMD lane computed, padding and finished pixels included.
std::atomic<int64_t> g_counts[4];

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

// Gaussian row r at a vector of pixels, one front-to-back compositing step: lanes still alive and
// `open` (before their limit) that pass the alpha test composite (h) unless the transmittance would
// fall to 1e-4 or below, which ends them. Forward and backward both call this, so they take the same
// decisions bit for bit; and each pixel meets its Gaussians in list order, as in gsplat's walk.
template <typename scalar_t>
struct Step {
  using V = typename Lanes<scalar_t>::V;
  using M = typename Lanes<scalar_t>::M;
  V dx, vis, alpha, T_before;
  M h;
  // With Skip (the backward: its per-vector work is larger than a mispredicted branch), returns false,
  // with h empty and only the lanes at their limit ended, where no lane is within sigma_cut (nothing
  // can composite: the rest is skipped and not counted). The decisions are the same either way.
  template <bool Skip>
  inline bool run(const scalar_t* r, const PixelVector<scalar_t>& pv, const M& open, V& T, M& alive, I8& tried) {
    const scalar_t t_min = static_cast<scalar_t>(kTMin), a_min = static_cast<scalar_t>(kAlphaMin);
    const scalar_t a_max = static_cast<scalar_t>(kAlphaMax);
    const scalar_t dy = r[1] - pv.py;
    dx = r[0] - pv.px;
    const V sigma = scalar_t(0.5) * (r[2] * (dx * dx) + r[4] * (dy * dy)) + r[3] * dx * dy;  // as gsplat rounds it
    if (Skip && !any(alive & (sigma <= r[6]))) {
      h = M{}, alive &= open;
      return false;
    }
    tally(tried, alive);
    msplat_simd::exp_neg(sigma, vis);
    const V raw = r[5] * vis;
    alpha = raw > a_max ? splat<V>(a_max) : raw;
    T_before = T;
    const V next_T = T_before * (scalar_t(1) - alpha);
    const M live = alive & open;
    const M ok = live & (sigma >= scalar_t(0)) & (alpha >= a_min);
    h = ok & (next_T > t_min);
    alive = live ^ (ok ^ h);  // ends where ok and not h (transmittance floor), or at the limit
    T = h ? next_T : T_before;
    return true;
  }
};


// Forward compositing of one tile (gathered rows, lists built), vector by vector: each vector's
// transmittance, colours and last row stay in registers while it walks its Gaussians in list order,
// until every lane has finished. DC: the colour channels at compile time (0: D at run time).
template <typename scalar_t, int DC>
void forward_tile(TileScratch<scalar_t>& s, int64_t stride, int64_t D_run, const TileWork& w, const scalar_t* bg,
                  int64_t width, int64_t height, scalar_t* out_c, scalar_t* out_a, int32_t* out_last,
                  int64_t* counts) {
  using V = typename Lanes<scalar_t>::V;
  using M = typename Lanes<scalar_t>::M;
  const int64_t D = DC > 0 ? DC : D_run;
  V acc_fixed[DC > 0 ? DC : 1];
  if (DC == 0) s.acc.resize(D);
  V* acc = DC > 0 ? acc_fixed : s.acc.data();
  const M open = ~M{};
  I8 tried{};
  int64_t lanes = 0;
  for (int64_t v = 0; v < s.nv; ++v) {
    const PixelVector<scalar_t> pv(w, s.vpr, v);
    V T = splat<V>(scalar_t(1));
    M alive = pv.inside;
    I8 last = splat<I8>(-1);
    for (int64_t d = 0; d < D; ++d) acc[d] = V{};
    Step<scalar_t> st;
    if (any(alive))
      for_each_row(s, v, [&](int32_t k) {
        const scalar_t* r = &s.rows[k * stride];
        st.template run<false>(r, pv, open, T, alive, tried);
        lanes += kLanes;
        const V wv = st.h ? st.alpha * st.T_before : V{};  // 0 where not composited: acc unchanged
        for (int64_t d = 0; d < D; ++d) acc[d] = fmadd(splat<V>(r[kRowHead + d]), wv, acc[d]);
        last = __builtin_convertvector(st.h, I8) ? splat<I8>(k) : last;
        return any(alive);
      });
    for (int64_t l = 0; l < kLanes && pv.x + l < w.x1; ++l) {
      const int64_t pix = (w.cam * height + pv.y) * width + pv.x + l;
      for (int64_t d = 0; d < D; ++d) out_c[pix * D + d] = bg ? acc[d][l] + T[l] * bg[w.cam * D + d] : acc[d][l];
      out_a[pix] = scalar_t(1) - T[l];
      out_last[pix] = last[l] < 0 ? -1 : static_cast<int32_t>(w.start + last[l]);
    }
  }
  counts[0] += tally_total(tried), counts[1] += lanes;
}

template <typename scalar_t>
void rasterize_fwd_impl(const RasterInputs& in, int64_t width, int64_t height, int64_t tile_size,
                        at::Tensor& render_colors, at::Tensor& render_alphas, at::Tensor& last_ids) {
  const int64_t C = in.C, D = in.D, tw = in.tile_width, n_tiles = tw * in.tile_height, stride = kRowHead + D;
  const int64_t n_total = C * n_tiles, M = in.M;
  const int32_t* offsets = in.offsets.data_ptr<int32_t>();
  const scalar_t* bg = in.backgrounds.defined() ? in.backgrounds.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_c = render_colors.data_ptr<scalar_t>();
  scalar_t* out_a = render_alphas.data_ptr<scalar_t>();
  int32_t* out_last = last_ids.data_ptr<int32_t>();

#pragma omp parallel
  {
    TileScratch<scalar_t> s;
    int64_t counts[2] = {0, 0};
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < n_total; ++t) {
      const TileWork w = tile_work(offsets, t, n_tiles, n_total, tw, tile_size, width, height, M);
      if (w.empty()) continue;
      const int64_t len = w.end - w.start;
      s.gather(in, w, w.start, len);
      if (D == 3)
        forward_tile<scalar_t, 3>(s, stride, D, w, bg, width, height, out_c, out_a, out_last, counts);
      else
        forward_tile<scalar_t, 0>(s, stride, D, w, bg, width, height, out_c, out_a, out_last, counts);
    }
    for (int i = 0; i < 2; ++i) g_counts[i] += counts[i];
  }
}
}  // namespace

// Front-to-back compositing. Returns render_colors [C, H, W, D], render_alphas [C, H, W, 1] and
// last_ids [C, H, W] int32: the index (into flatten_ids) of each pixel's last composited
// intersection, -1 if none, which bounds the backward pass's walk.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rasterize_to_pixels_fwd(
    const at::Tensor& means2d,                      // [C, N, 2]
    const at::Tensor& conics,                       // [C, N, 3]
    const at::Tensor& colors,                       // [C, N, D]
    const at::Tensor& opacities,                    // [C, N]
    const std::optional<at::Tensor>& backgrounds,   // [C, D]
    int64_t width, int64_t height, int64_t tile_size,
    const at::Tensor& isect_offsets,                // [C, tile_height, tile_width] int32
    const at::Tensor& flatten_ids) {                // [M] int32
  const RasterInputs in = check_raster_inputs(means2d, conics, colors, opacities, backgrounds, width, height,
                                              tile_size, isect_offsets, flatten_ids);
  at::Tensor render_colors = at::empty({in.C, height, width, in.D}, in.colors.options());
  at::Tensor render_alphas = at::empty({in.C, height, width, 1}, in.colors.options());
  at::Tensor last_ids = at::empty({in.C, height, width}, in.flatten_ids.options());
  AT_DISPATCH_FLOATING_TYPES(in.colors.scalar_type(), "rasterize_to_pixels_fwd", [&] {
    rasterize_fwd_impl<scalar_t>(in, width, height, tile_size, render_colors, render_alphas, last_ids);
  });
  return {render_colors, render_alphas, last_ids};
}

namespace {

constexpr int64_t kBatchTiles = 64;  // tiles whose gradient rows the backward holds at once

// Per-Gaussian gradient row layout in the accumulation buffers.
struct GradLayout {
  int64_t D, mean = 0, conic = 2, opacity = 5, color = 6, abs, width;
  explicit GradLayout(int64_t d, bool absgrad) : D(d), abs(6 + d), width(6 + d + (absgrad ? 2 : 0)) {}
};

// Backward pass. For a pixel with composited Gaussians k (front to back) with alphas a_k,
// transmittances T_k in front of them, colours c_k and final transmittance T_f:
//   out = sum_k c_k a_k T_k + T_f bg,  alpha_out = 1 - T_f.
// With S_k = sum_{j>k} c_j a_j prod_{k<i<j}(1 - a_i) and B_k = prod_{i>k}(1 - a_i) (both built
// back to front), d out / d a_k = T_k (c_k - S_k - B_k bg) and d alpha_out / d a_k = T_k B_k.
// The pixel's T_k are recomputed front to back exactly as the forward pass did, so no division by
// (1 - a_k) is needed. Then a_k = min(0.999, o_k exp(-sigma_k)) passes gradient to o_k and sigma_k
// only where o_k exp(-sigma_k) <= 0.999.

// The pixels' inputs of the backward pass.
template <typename scalar_t>
struct PixelGrads {
  const scalar_t *vc, *va, *bg;  // [C, H, W, D], [C, H, W], [C, D] or null
  const int32_t* last;           // [C, H, W]
  int64_t width, height;
};

// Each pixel's limit in a tile's rows: one past its last composited row (forward pass), in [0, len].
inline int32_t pixel_limit(int32_t last, const TileWork& w) {
  return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(int64_t(last) + 1, w.start), w.end) - w.start);
}

// Backward of one tile (rows gathered, lists built), vector by vector: the forward walk is replayed up
// to each lane's limit, keeping the composited Gaussians (h, vis, T in front); then back to front,
// with S and B in registers, each Gaussian's per-lane gradients are summed over the lanes (a fixed
// tree) and added to its row of tile_grad (scalar_t, [len, K]), vectors in order. So a row's value
// depends on the tile alone, not on threads or on which member renders the tile.
template <typename scalar_t, int DC>
void backward_tile(TileScratch<scalar_t>& s, int64_t stride, int64_t D_run, const TileWork& w,
                   const PixelGrads<scalar_t>& in, const GradLayout& L, bool absgrad, scalar_t* tile_grad,
                   double* tbg, int64_t* counts) {
  using V = typename Lanes<scalar_t>::V;
  using M = typename Lanes<scalar_t>::M;
  constexpr int64_t kMaxK = 16;
  const int64_t D = DC > 0 ? DC : D_run, K = L.width;
  const scalar_t a_max = static_cast<scalar_t>(kAlphaMax);
  V vc_fixed[DC > 0 ? DC : 1], S_fixed[DC > 0 ? DC : 1], g_fixed[DC > 0 ? 6 + DC + 2 : 1];
  if (DC == 0) s.acc.resize(2 * D + K);
  V* vc = DC > 0 ? vc_fixed : s.acc.data();
  V* S = DC > 0 ? S_fixed : s.acc.data() + D;
  V* g = DC > 0 ? g_fixed : s.acc.data() + 2 * D;
  static_assert(DC == 0 || 6 + DC + 2 <= kMaxK, "gradient rows fit the lane sums below");
  I8 tried{};
  int64_t lanes = 0;
  for (int64_t v = 0; v < s.nv; ++v) {
    const PixelVector<scalar_t> pv(w, s.vpr, v);
    const int64_t pix0 = (w.cam * in.height + pv.y) * in.width + pv.x;
    I8 limit{};
    V va{}, bg_dot{};
    for (int64_t d = 0; d < D; ++d) vc[d] = V{};
    for (int64_t l = 0; l < kLanes && pv.x + l < w.x1; ++l) {
      const int64_t pix = pix0 + l;
      limit[l] = pixel_limit(in.last[pix], w);
      va[l] = in.va[pix];
      for (int64_t d = 0; d < D; ++d) {
        vc[d][l] = in.vc[pix * D + d];
        if (in.bg) bg_dot[l] += in.bg[w.cam * D + d] * vc[d][l];
      }
    }
    // Replay front to back.
    V T = splat<V>(scalar_t(1));
    M alive = pv.inside;
    int64_t n_hits = 0;
    Step<scalar_t> st;
    if (any(alive))
      for_each_row(s, v, [&](int32_t k) {
        const M open = __builtin_convertvector(splat<I8>(k) < limit, M);
        if (!st.template run<true>(&s.rows[k * stride], pv, open, T, alive, tried)) return any(alive);
        lanes += kLanes;
        if (any(st.h)) {
          s.hit_k[n_hits] = k, s.hit_h[n_hits] = st.h, s.hit_vis[n_hits] = st.vis, s.hit_T[n_hits] = st.T_before;
          ++n_hits;
        }
        return any(alive);
      });
    for (int64_t l = 0; l < kLanes && pv.x + l < w.x1; ++l)
      for (int64_t d = 0; d < D; ++d) tbg[d] += double(T[l] * vc[d][l]);
    // Back to front.
    V B = splat<V>(scalar_t(1));
    for (int64_t d = 0; d < D; ++d) S[d] = V{};
    for (int64_t j = n_hits - 1; j >= 0; --j) {
      const scalar_t* r = &s.rows[s.hit_k[j] * stride];
      const M h = s.hit_h[j];
      const V vis = s.hit_vis[j], Tk = s.hit_T[j];
      const V dx = r[0] - pv.px;
      const scalar_t dy = r[1] - pv.py;
      const V raw = r[5] * vis;
      const V alpha = raw > a_max ? splat<V>(a_max) : raw;
      const V w8 = alpha * Tk;
      V v_alpha_c{};
      for (int64_t d = 0; d < D; ++d) {
        g[L.color + d] = h ? w8 * vc[d] : V{};
        v_alpha_c += (r[kRowHead + d] - S[d]) * vc[d];
      }
      const V v_alpha = Tk * (v_alpha_c - B * bg_dot + B * va);
      const M geo = h & (raw <= a_max);
      const V v_sigma = -raw * v_alpha;
      const V gx = v_sigma * (r[2] * dx + r[3] * dy), gy = v_sigma * (r[3] * dx + r[4] * dy);
      g[L.conic] = geo ? scalar_t(0.5) * v_sigma * dx * dx : V{};
      g[L.conic + 1] = geo ? v_sigma * dx * dy : V{};
      g[L.conic + 2] = geo ? scalar_t(0.5) * v_sigma * dy * dy : V{};
      g[L.mean] = geo ? gx : V{};
      g[L.mean + 1] = geo ? gy : V{};
      g[L.opacity] = geo ? vis * v_alpha : V{};
      if (absgrad) {
        g[L.abs] = geo ? (gx < scalar_t(0) ? -gx : gx) : V{};
        g[L.abs + 1] = geo ? (gy < scalar_t(0) ? -gy : gy) : V{};
      }
      const V one_minus = scalar_t(1) - alpha;
      for (int64_t d = 0; d < D; ++d) S[d] = h ? r[kRowHead + d] * alpha + one_minus * S[d] : S[d];
      B = h ? B * one_minus : B;
      scalar_t* gr = &tile_grad[s.hit_k[j] * K];
      const int64_t first_single = K >= 8 ? 8 : 0;
      if (K >= 8) msplat_simd::add_lane_sums8(g, gr);
      for (int64_t q = first_single; q < K; ++q) gr[q] += msplat_simd::lane_sum(g[q]);
    }
  }
  counts[2] += tally_total(tried), counts[3] += lanes;
}

// Per-Gaussian sums, independent of threads and of how tiles are split among members: tiles go in
// batches of kBatchTiles (a constant, not the thread count); each tile of a batch writes its rows
// (in scalar_t) into the batch's `grads`, one row per intersection, and after the batch each
// Gaussian's float64 sum adds its rows in intersection order, i.e. tile order, whatever thread ran
// them (each thread owns a range of Gaussians). So the scratch is one batch's rows, whatever the
// thread count, and the sums equal a one-thread walk bit for bit. The background gradient is summed
// per tile in float64, then over tiles in order.
template <typename scalar_t>
void rasterize_bwd_impl(const RasterInputs& in, int64_t width, int64_t height, int64_t tile_size,
                        const at::Tensor& last_ids, const at::Tensor& v_colors_out, const at::Tensor& v_alphas_out,
                        bool absgrad, at::Tensor& sums, at::Tensor& v_backgrounds) {
  const int64_t C = in.C, D = in.D, CN = in.C * in.N, tw = in.tile_width, n_tiles = tw * in.tile_height;
  const int64_t stride = kRowHead + D, n_total = C * n_tiles, M = in.M;
  const GradLayout L(D, absgrad);
  const int64_t K = L.width;
  const int32_t* offsets = in.offsets.data_ptr<int32_t>();
  const int32_t* flat = in.flatten_ids.data_ptr<int32_t>();
  const PixelGrads<scalar_t> pixels{v_colors_out.data_ptr<scalar_t>(), v_alphas_out.data_ptr<scalar_t>(),
                                    in.backgrounds.defined() ? in.backgrounds.data_ptr<scalar_t>() : nullptr,
                                    last_ids.data_ptr<int32_t>(), width, height};

  const auto position = [&](int64_t t) -> int64_t { return t < n_total ? offsets[t] : M; };
  int64_t batch_rows = 0;
  for (int64_t b = 0; b < n_total; b += kBatchTiles)
    batch_rows = std::max<int64_t>(batch_rows, position(std::min(b + kBatchTiles, n_total)) - position(b));
  at::Tensor grads = at::empty({batch_rows, K}, in.colors.options());  // one row per intersection of a batch
  double* out = sums.data_ptr<double>();
  std::fill(out, out + CN * K, 0.0);
  at::Tensor tile_bg = at::zeros({n_total, D}, in.colors.options().dtype(at::kDouble));
  scalar_t* grads_p = grads.data_ptr<scalar_t>();
  double* tile_bg_p = tile_bg.data_ptr<double>();

#pragma omp parallel
  {
    TileScratch<scalar_t> s;
    int64_t counts[4] = {0, 0, 0, 0};
    const int64_t n_threads = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t g_lo = CN * tid / n_threads, g_hi = CN * (tid + 1) / n_threads;  // this thread's sums
    for (int64_t b0 = 0; b0 < n_total; b0 += kBatchTiles) {
      const int64_t b1 = std::min(b0 + kBatchTiles, n_total), p0 = position(b0), p1 = std::max(position(b1), p0);
#pragma omp for schedule(dynamic)
      for (int64_t t = b0; t < b1; ++t) {
        const TileWork w = tile_work(offsets, t, n_tiles, n_total, tw, tile_size, width, height, M);
        const int64_t start = std::max(w.start, p0), end = std::min(w.end, p1);
        if (end > start) std::fill(grads_p + (start - p0) * K, grads_p + (end - p0) * K, scalar_t(0));
        if (w.empty() || w.start < p0 || w.end > p1) continue;  // (offsets from isect_offset_encode are sorted)
        int64_t len = 0;  // rows up to the last composited one of any pixel
        for (int64_t y = w.y0; y < w.y1; ++y)
          for (int64_t x = w.x0; x < w.x1; ++x)
            len = std::max<int64_t>(len, pixel_limit(pixels.last[(w.cam * height + y) * width + x], w));
        s.gather(in, w, w.start, len);
        s.hit_k.resize(len), s.hit_h.resize(len), s.hit_vis.resize(len), s.hit_T.resize(len);
        scalar_t* tile_grad = grads_p + (w.start - p0) * K;
        double* tbg = tile_bg_p + t * D;
        if (D == 3)
          backward_tile<scalar_t, 3>(s, stride, D, w, pixels, L, absgrad, tile_grad, tbg, counts);
        else
          backward_tile<scalar_t, 0>(s, stride, D, w, pixels, L, absgrad, tile_grad, tbg, counts);
      }
      // (the omp for's barrier: every row of the batch is written) Each thread adds the rows of its
      // own Gaussians in intersection order; the barrier keeps the next batch from overwriting them.
      for (int64_t i = p0; i < p1; ++i) {
        const int64_t g = flat[i];
        if (g < g_lo || g >= g_hi) continue;
        double* dst = out + g * K;
        const scalar_t* src = grads_p + (i - p0) * K;
        for (int64_t j = 0; j < K; ++j) dst[j] += src[j];
      }
#pragma omp barrier
    }
    for (int i = 2; i < 4; ++i) g_counts[i] += counts[i];
  }
  scalar_t* v_bg = v_backgrounds.data_ptr<scalar_t>();
  for (int64_t cam = 0; cam < C; ++cam)
    for (int64_t d = 0; d < D; ++d) {
      double sum = 0;  // over the camera's tiles in order
      for (int64_t t = 0; t < n_tiles; ++t) sum += tile_bg_p[(cam * n_tiles + t) * D + d];
      v_bg[cam * D + d] = static_cast<scalar_t>(sum);
    }
}

}  // namespace

// Gradients of rasterize_to_pixels_fwd. Returns v_means2d [C, N, 2], v_means2d_abs ([C, N, 2] with
// absgrad, else empty: the sum over pixels of |per-pixel v_means2d|, which gsplat's
// DefaultStrategy reads), v_conics [C, N, 3], v_colors [C, N, D], v_opacities [C, N] and
// v_backgrounds [C, D] (computed even without backgrounds; the caller then drops it). With
// float64_sums the five per-Gaussian gradients are the unrounded float64 sums, so that partial sums
// over different tiles (members of an aggregate device) add up to the single-device result.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rasterize_to_pixels_bwd(
    const at::Tensor& means2d,                      // [C, N, 2]
    const at::Tensor& conics,                       // [C, N, 3]
    const at::Tensor& colors,                       // [C, N, D]
    const at::Tensor& opacities,                    // [C, N]
    const std::optional<at::Tensor>& backgrounds,   // [C, D]
    int64_t width, int64_t height, int64_t tile_size,
    const at::Tensor& isect_offsets,                // [C, tile_height, tile_width] int32
    const at::Tensor& flatten_ids,                  // [M] int32
    const at::Tensor& last_ids,                     // [C, H, W] int32, from the forward pass
    const at::Tensor& v_render_colors,              // [C, H, W, D]
    const at::Tensor& v_render_alphas,              // [C, H, W, 1]
    bool absgrad, bool float64_sums) {
  const RasterInputs in = check_raster_inputs(means2d, conics, colors, opacities, backgrounds, width, height,
                                              tile_size, isect_offsets, flatten_ids);
  const int64_t C = in.C, N = in.N, D = in.D;
  check_cpu(last_ids, "last_ids");
  check_cpu(v_render_colors, "v_render_colors");
  check_cpu(v_render_alphas, "v_render_alphas");
  TORCH_CHECK(last_ids.sizes() == at::IntArrayRef({C, height, width}) && last_ids.scalar_type() == at::kInt,
              "last_ids must be [C, H, W] int32, got ", last_ids.sizes());
  TORCH_CHECK(v_render_colors.sizes() == at::IntArrayRef({C, height, width, D}),
              "v_render_colors must be [C, H, W, D], got ", v_render_colors.sizes());
  TORCH_CHECK(v_render_alphas.sizes() == at::IntArrayRef({C, height, width, 1}),
              "v_render_alphas must be [C, H, W, 1], got ", v_render_alphas.sizes());
  const auto options = in.colors.options();
  const at::Tensor v_c = v_render_colors.to(options.dtype()).contiguous();
  const at::Tensor v_a = v_render_alphas.to(options.dtype()).contiguous();
  const at::Tensor last = last_ids.contiguous();
  const GradLayout L(D, absgrad);
  at::Tensor sums = at::empty({C * N, L.width}, options.dtype(at::kDouble));
  at::Tensor v_backgrounds = at::empty({C, D}, options);
  AT_DISPATCH_FLOATING_TYPES(in.colors.scalar_type(), "rasterize_to_pixels_bwd", [&] {
    rasterize_bwd_impl<scalar_t>(in, width, height, tile_size, last, v_c, v_a, absgrad, sums, v_backgrounds);
  });
  const auto out_dtype = float64_sums ? at::kDouble : options.dtype().toScalarType();
  const auto columns = [&](int64_t first, int64_t count, std::vector<int64_t> shape) {
    return sums.narrow(1, first, count).reshape(shape).to(out_dtype).contiguous();
  };
  return {columns(L.mean, 2, {C, N, 2}), absgrad ? columns(L.abs, 2, {C, N, 2}) : at::empty({0}, options),
          columns(L.conic, 3, {C, N, 3}), columns(L.color, D, {C, N, D}), columns(L.opacity, 1, {C, N}),
          v_backgrounds};
}

// The kernels' evaluation counts since the last reset, int64 [4]: forward (Gaussian, pixel) pairs
// evaluated, forward SIMD lanes computed, and the same for the backward pass's sweep.
at::Tensor raster_counts(bool reset) {
  at::Tensor out = at::empty({4}, at::kLong);
  for (int i = 0; i < 4; ++i) out[i] = reset ? g_counts[i].exchange(0) : g_counts[i].load();
  return out;
}

TORCH_LIBRARY_FRAGMENT(ms_splatfacto, m) {
  m.def("raster_counts", &raster_counts);
  m.def("rasterize_to_pixels_fwd", &rasterize_to_pixels_fwd);
  m.def("rasterize_to_pixels_bwd", &rasterize_to_pixels_bwd);
}
