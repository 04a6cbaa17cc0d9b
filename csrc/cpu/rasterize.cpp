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

// A tile's Gaussians gathered into rows {mean x, mean y, conic a, b, c, opacity, x_lo, x_hi, y_lo,
// y_hi, colour[D]}, so the per-pixel loops read contiguous memory. [x_lo, x_hi] x [y_lo, y_hi]
// bounds the pixel centres where the Gaussian can reach alpha >= 1/255 (see `reach_box`).
constexpr int64_t kRowHead = 10;

// Conservative box around the ellipse 0.5 d^T Q d <= t, t = log(255 opacity), outside which the
// Gaussian's alpha is below 1/255: half-widths sqrt(2 t (Q^-1)_xx) and sqrt(2 t (Q^-1)_yy). Every
// pixel outside the box is one the reference skips, so the box only saves work. It is widened so
// that rounding cannot break that: sigma as computed in scalar_t can be off by about
// 12 eps cond(Q) relative (cancellation in elongated conics), so t grows by 16 eps cond(Q) + 0.1 %
// (where that exceeds 50 %, or the conic is not positive definite, or inputs are NaN, the box is
// unbounded), and the half-widths by 1 % plus 0.01 px plus the rounding of the mean.
template <typename scalar_t>
void reach_box(scalar_t* r) {
  const double a = r[2], b = r[3], c = r[4], det = a * c - b * b;
  const double t = std::max(0.0, std::log(255.0 * double(r[5])));
  const double inf = std::numeric_limits<double>::infinity();
  const double eps = std::numeric_limits<scalar_t>::epsilon();
  double ex = inf, ey = inf;
  if (a > 0 && c > 0 && det > 0 && t < inf) {
    const double lmax = 0.5 * (a + c) + std::sqrt(0.25 * (a - c) * (a - c) + b * b);
    const double rel = 16.0 * eps * (lmax * lmax / det) + 1e-3;
    if (rel < 0.5) {
      const double t_safe = t * (1.0 + rel) + 1e-3;
      const double slack = 0.01 + 4.0 * eps * (std::abs(double(r[0])) + std::abs(double(r[1])));
      ex = std::sqrt(2.0 * t_safe * c / det) * 1.01 + slack;
      ey = std::sqrt(2.0 * t_safe * a / det) * 1.01 + slack;
    }
  }
  r[6] = static_cast<scalar_t>(double(r[0]) - ex), r[7] = static_cast<scalar_t>(double(r[0]) + ex);
  r[8] = static_cast<scalar_t>(double(r[1]) - ey), r[9] = static_cast<scalar_t>(double(r[1]) + ey);
}

template <typename scalar_t>
void gather_tile(const RasterInputs& in, int64_t start, int64_t len, std::vector<scalar_t>& rows) {
  const int64_t D = in.D, stride = kRowHead + D;
  const scalar_t* m = in.means2d.data_ptr<scalar_t>();
  const scalar_t* q = in.conics.data_ptr<scalar_t>();
  const scalar_t* col = in.colors.data_ptr<scalar_t>();
  const scalar_t* op = in.opacities.data_ptr<scalar_t>();
  const int32_t* ids = in.flatten_ids.data_ptr<int32_t>();
  rows.resize(len * stride);
  constexpr int64_t ahead = 8;  // the Gaussians are scattered in memory: fetch a few rows early
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
    reach_box(r);
    for (int64_t d = 0; d < D; ++d) r[kRowHead + d] = col[D * g + d];
  }
}

// Pixels [s, e) within [a, b) whose centre x + 0.5 may lie in [lo, hi], with one pixel of slack
// (the box is only a shortcut; the sweep's alpha test decides). NaN bounds give the whole range.
inline void pixel_span(double lo, double hi, int64_t a, int64_t b, int64_t& s, int64_t& e) {
  const double fs = std::floor(lo - 0.5), fe = std::ceil(hi - 0.5) + 1.0;
  s = fs > double(a) ? (fs < double(b) ? int64_t(fs) : b) : a;
  e = fe < double(b) ? (fe > double(a) ? int64_t(fe) : a) : b;
}

constexpr int64_t kLanes = 8;  // pixels per vector step (one AVX2 register of float32)

// kLanes values of scalar_t (GCC/Clang vector extension: the compiler emits the widest SIMD the
// target has, with no scalar tail), its comparison masks (-1 / 0 per lane) and kLanes int32.
template <typename scalar_t>
struct Lanes {
  typedef scalar_t V __attribute__((vector_size(sizeof(scalar_t) * kLanes)));
  using M = decltype(V{} < V{});
};
typedef int32_t I8 __attribute__((vector_size(4 * kLanes)));
constexpr I8 kIota = {0, 1, 2, 3, 4, 5, 6, 7};
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte double lanes without AVX-512: inline only, no ABI

template <typename V>
inline V splat(typename std::remove_reference<decltype(V{}[0])>::type x) {
  return V{} + x;
}

// exp(-s), lane by lane. float: a Cephes-style polynomial (within 2 ulp of expf) in plain arithmetic,
// so every lane rounds alike; s > 87 (alpha far below 1/255 for any opacity <= 1) gives 0 and NaN
// gives 0 (such lanes are masked out). double: std::exp.
inline void exp_neg(const Lanes<double>::V& s, Lanes<double>::V& out) {
  for (int64_t l = 0; l < kLanes; ++l) out[l] = std::exp(-s[l]);
}

inline void exp_neg(const Lanes<float>::V& s, Lanes<float>::V& out) {
  using V = Lanes<float>::V;
  V x = -s;
  x = x >= -87.0f ? x : splat<V>(-87.0f);  // NaN becomes -87 too
  x = x <= 0.0f ? x : splat<V>(0.0f);
  const V kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  V r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  const I8 bits = (__builtin_convertvector(kf, I8) + 127) << 23;  // 2^kf, kf in [-126, 0]
  const V result = y * reinterpret_cast<const V&>(bits);
  out = s > 87.0f ? splat<V>(0.0f) : (s >= 0.0f ? result : splat<V>(0.0f));
}

// Tile t (flattened over cameras): its camera, pixel rectangle [x0, x1) x [y0, y1) clipped to the
// image, and its range [start, end) in the sorted intersections.
struct TileWork {
  int64_t cam, x0, y0, x1, y1, start, end;
  bool empty() const { return x0 >= x1 || y0 >= y1; }
  int64_t n_pixels() const { return (x1 - x0) * (y1 - y0); }
};

inline TileWork tile_work(const int32_t* offsets, int64_t t, int64_t n_tiles, int64_t n_total_tiles, int64_t tw,
                          int64_t tile_size, int64_t width, int64_t height, int64_t M) {
  const int64_t tile = t % n_tiles, x0 = (tile % tw) * tile_size, y0 = (tile / tw) * tile_size;
  const int64_t start = offsets[t];
  const int64_t end = std::max<int64_t>(t + 1 < n_total_tiles ? offsets[t + 1] : M, start);
  return {t / n_tiles, x0, y0, std::min(x0 + tile_size, width), std::min(y0 + tile_size, height), start, end};
}

// 64-byte aligned storage, so that a vector of kLanes pixels starting at a multiple of kLanes is
// aligned and the compiler neither peels scalar iterations nor versions the loop.
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

// Per-thread state of one tile's pixels, rows padded to a multiple of kLanes (padding is never alive),
// pixel p = (y - y0) * pw + (x - x0). Sized once per thread: no allocation per tile or pixel.
template <typename scalar_t>
struct TileScratch {
  int64_t pw = 0, n = 0;
  std::vector<scalar_t> rows;
  AlignedVector<scalar_t> T, acc;  // acc: [D][n] forward colours; [n][D] backward S
  AlignedVector<int32_t> alive, last, limit;
  void reset(const TileWork& w, int64_t D) {
    pw = (w.x1 - w.x0 + kLanes - 1) / kLanes * kLanes;
    n = pw * (w.y1 - w.y0);
    T.assign(n, scalar_t(1));
    acc.assign(n * D, scalar_t(0));
    alive.resize(n);
    last.assign(n, -1);
    for (int64_t p = 0; p < n; ++p) alive[p] = (p % pw) < (w.x1 - w.x0);
  }
};

// One composited (Gaussian, pixel) pair recorded by the backward pass's sweep.
template <typename scalar_t>
struct Hit {
  int32_t p;  // pixel in the tile scratch
  scalar_t dx, dy, vis, alpha, T;  // T: transmittance in front of this Gaussian
};

// Evaluations the kernels performed: {forward pairs, forward lanes, backward pairs, backward lanes}.
// A pair is a Gaussian evaluated at a still-compositing pixel of its reach box's span of vectors; lanes
// count every SIMD lane computed, padding and finished pixels included.
std::atomic<int64_t> g_counts[4];

// Front-to-back compositing of one tile, Gaussian by Gaussian: each Gaussian visits the vectors of
// pixels covering its reach box's rows and columns, and every pixel meets its Gaussians in list order,
// so the result is that of gsplat's per-pixel walk. A pixel stops before the Gaussian that would bring
// its transmittance to <= 1e-4, or (backward pass: Record) at list row limit[p]. Forward: acc and
// last collect colours and last rows; Record: hits are appended Gaussian by Gaussian, pixels in
// order, and seg[k] is where Gaussian k's begin. Forward and backward run this same code, so they
// take the same decisions bit for bit.
template <typename scalar_t, bool Record>
void sweep_tile(TileScratch<scalar_t>& s, int64_t stride, int64_t len, int64_t D, const TileWork& w,
                std::vector<Hit<scalar_t>>* hits, std::vector<int64_t>* seg, int64_t* counts) {
  const scalar_t t_min = static_cast<scalar_t>(kTMin), a_min = static_cast<scalar_t>(kAlphaMin);
  const scalar_t a_max = static_cast<scalar_t>(kAlphaMax);
  const int64_t pw = s.pw, n = s.n, x0 = w.x0, y0 = w.y0;
  scalar_t* T = s.T.data();
  scalar_t* acc = s.acc.data();
  int32_t* alive = s.alive.data();
  int32_t* last = s.last.data();
  const int32_t* limit = s.limit.data();
  int64_t active = w.n_pixels(), evaluated = 0, lanes = 0;
  if (Record) hits->clear(), seg->assign(len + 1, -1);
  for (int64_t k = 0; k < len && active > 0; ++k) {
    if (Record) (*seg)[k] = static_cast<int64_t>(hits->size());
    const scalar_t* r = &s.rows[k * stride];
    int64_t xs, xe, ys, ye;
    pixel_span(r[6], r[7], x0, w.x1, xs, xe);
    pixel_span(r[8], r[9], y0, w.y1, ys, ye);
    if (xs >= xe || ys >= ye) continue;
    const int64_t cs = (xs - x0) / kLanes * kLanes, ce = xe - x0;  // vectors [cs, ce) of each row
    const scalar_t mx = r[0], my = r[1], qa = r[2], qb = r[3], qc = r[4], op = r[5];
    const int32_t kk = static_cast<int32_t>(k);
    typename Lanes<scalar_t>::M ended_v{}, tried_v{};
    for (int64_t y = ys; y < ye; ++y) {
      const scalar_t py = static_cast<scalar_t>(y) + scalar_t(0.5);
      const scalar_t dy = my - py;
      for (int64_t c = cs; c < ce; c += kLanes) {
        const int64_t base = (y - y0) * pw + c;
        scalar_t* const Tb = static_cast<scalar_t*>(__builtin_assume_aligned(T + base, 32));
        int32_t* const alive_b = static_cast<int32_t*>(__builtin_assume_aligned(alive + base, 32));
        int32_t* const last_b = static_cast<int32_t*>(__builtin_assume_aligned(last + base, 32));
        const int32_t* const limit_b = Record ? static_cast<const int32_t*>(__builtin_assume_aligned(limit + base, 32)) : nullptr;
        using V = typename Lanes<scalar_t>::V;
        using M = typename Lanes<scalar_t>::M;
        const V px = __builtin_convertvector(kIota + static_cast<int32_t>(x0 + c), V) + scalar_t(0.5);
        const V dx = mx - px;
        const V sigma = scalar_t(0.5) * (qa * (dx * dx) + qc * (dy * dy)) + qb * dx * dy;
        V vis;
        exp_neg(sigma, vis);
        const V raw = op * vis;
        const V alpha = raw > a_max ? splat<V>(a_max) : raw;  // NaN stays NaN
        const V T_before = *reinterpret_cast<const V*>(Tb);
        const V next_T = T_before * (scalar_t(1) - alpha);
        const M was_alive = __builtin_convertvector(*reinterpret_cast<const I8*>(alive_b), M) != 0;
        const M at_limit = Record ? __builtin_convertvector(kk >= *reinterpret_cast<const I8*>(limit_b), M) : M{};
        const M ok = was_alive & ~at_limit & (sigma >= scalar_t(0)) & (alpha >= a_min);
        const M stop = ok & ~(next_T > t_min);
        const M h = ok & ~stop;
        const M ends = was_alive & (at_limit | stop);
        ended_v += ends, tried_v += was_alive;  // -1 per lane
        *reinterpret_cast<I8*>(alive_b) = __builtin_convertvector(was_alive & ~at_limit & ~stop, I8);
        *reinterpret_cast<V*>(Tb) = h ? next_T : T_before;
        const V wv = h ? alpha * T_before : V{};  // no subnormal products from far lanes
        if (!Record) {
          const I8 hk = __builtin_convertvector(h, I8);
          *reinterpret_cast<I8*>(last_b) = hk ? splat<I8>(kk) : *reinterpret_cast<const I8*>(last_b);
        }
        lanes += kLanes;
        if (Record) {
          for (int64_t l = 0; l < kLanes; ++l)
            if (h[l]) hits->push_back({static_cast<int32_t>(base + l), dx[l], dy, vis[l], alpha[l], T_before[l]});
        } else {
          for (int64_t d = 0; d < D; ++d) {
            V* a = reinterpret_cast<V*>(&acc[d * n + base]);
            *a = h ? *a + r[kRowHead + d] * wv : *a;
          }
        }
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) active += ended_v[l], evaluated -= tried_v[l];
  }
  if (Record)  // rows after an early exit (every pixel finished) and the end get the final size
    for (int64_t k = 0; k <= len; ++k)
      if ((*seg)[k] < 0) (*seg)[k] = static_cast<int64_t>(hits->size());
  counts[Record ? 2 : 0] += evaluated, counts[Record ? 3 : 1] += lanes;
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
    int64_t counts[4] = {0, 0, 0, 0};
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < n_total; ++t) {
      const TileWork w = tile_work(offsets, t, n_tiles, n_total, tw, tile_size, width, height, M);
      if (w.empty()) continue;
      const int64_t cam = w.cam, start = w.start, len = w.end - start;
      gather_tile(in, start, len, s.rows);
      s.reset(w, D);
      sweep_tile<scalar_t, false>(s, stride, len, D, w, nullptr, nullptr, counts);
      for (int64_t y = w.y0; y < w.y1; ++y) {
        for (int64_t x = w.x0; x < w.x1; ++x) {
          const int64_t p = (y - w.y0) * s.pw + (x - w.x0), pix = (cam * height + y) * width + x;
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t a = s.acc[d * s.n + p];
            out_c[pix * D + d] = bg ? a + s.T[p] * bg[cam * D + d] : a;
          }
          out_a[pix] = scalar_t(1) - s.T[p];
          out_last[pix] = s.last[p] < 0 ? -1 : static_cast<int32_t>(start + s.last[p]);
        }
      }
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
//
// The sweep records hits Gaussian by Gaussian; walking the Gaussians back to front (each one's
// pixels in order) keeps every pixel back to front and adds each Gaussian's pixels in pixel order.
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
  const int32_t* last_p = last_ids.data_ptr<int32_t>();
  const scalar_t* bg = in.backgrounds.defined() ? in.backgrounds.data_ptr<scalar_t>() : nullptr;
  const scalar_t* vc = v_colors_out.data_ptr<scalar_t>();
  const scalar_t* va = v_alphas_out.data_ptr<scalar_t>();
  const scalar_t alpha_max = static_cast<scalar_t>(kAlphaMax);

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
    std::vector<Hit<scalar_t>> hits;
    std::vector<int64_t> seg;
    std::vector<scalar_t> v_c, v_a, bg_dot, B;
    int64_t counts[4] = {0, 0, 0, 0};
    const int64_t n_threads = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t g_lo = CN * tid / n_threads, g_hi = CN * (tid + 1) / n_threads;  // this thread's sums
    for (int64_t b0 = 0; b0 < n_total; b0 += kBatchTiles) {
      const int64_t b1 = std::min(b0 + kBatchTiles, n_total), p0 = position(b0), p1 = std::max(position(b1), p0);
#pragma omp for schedule(dynamic)
      for (int64_t t = b0; t < b1; ++t) {
        const TileWork w = tile_work(offsets, t, n_tiles, n_total, tw, tile_size, width, height, M);
        const int64_t cam = w.cam, start = std::max(w.start, p0), end = std::min(w.end, p1);
        if (end > start) std::fill(grads_p + (start - p0) * K, grads_p + (end - p0) * K, scalar_t(0));
        if (w.empty() || w.start < p0 || w.end > p1) continue;  // (offsets from isect_offset_encode are sorted)
        s.reset(w, D);
        // Re-run the forward sweep up to each pixel's last composited row, recording the hits.
        s.limit.assign(s.n, 0);
        v_c.assign(s.n * D, scalar_t(0));
        v_a.assign(s.n, scalar_t(0));
        bg_dot.assign(s.n, scalar_t(0));
        B.assign(s.n, scalar_t(1));
        int64_t len = 0;
        for (int64_t y = w.y0; y < w.y1; ++y) {
          for (int64_t x = w.x0; x < w.x1; ++x) {
            const int64_t p = (y - w.y0) * s.pw + (x - w.x0), pix = (cam * height + y) * width + x;
            const int64_t last = last_p[pix];
            s.limit[p] = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(last + 1, start), end) - start);
            len = std::max<int64_t>(len, s.limit[p]);
            for (int64_t d = 0; d < D; ++d) {
              v_c[p * D + d] = vc[pix * D + d];
              if (bg) bg_dot[p] += bg[cam * D + d] * v_c[p * D + d];
            }
            v_a[p] = va[pix];
          }
        }
        gather_tile(in, start, len, s.rows);
        sweep_tile<scalar_t, true>(s, stride, len, D, w, &hits, &seg, counts);
        double* tbg = tile_bg_p + t * D;
        for (int64_t y = w.y0; y < w.y1; ++y)
          for (int64_t x = w.x0; x < w.x1; ++x) {
            const int64_t p = (y - w.y0) * s.pw + (x - w.x0);
            for (int64_t d = 0; d < D; ++d) tbg[d] += double(s.T[p] * v_c[p * D + d]);
          }
        // Back to front over Gaussians; S (in s.acc, [n][D] here) and B per pixel.
        scalar_t* S = s.acc.data();
        scalar_t* tile_grad = grads_p + (start - p0) * K;
        for (int64_t k = len - 1; k >= 0; --k) {
          const scalar_t* r = &s.rows[k * stride];
          scalar_t* gr = &tile_grad[k * K];
          for (int64_t i = seg[k]; i < seg[k + 1]; ++i) {
            const Hit<scalar_t>& h = hits[i];
            const int64_t p = h.p;
            scalar_t* Sp = &S[p * D];
            const scalar_t* vcp = &v_c[p * D];
            const scalar_t w8 = h.alpha * h.T;
            scalar_t v_alpha_c = 0;
            for (int64_t d = 0; d < D; ++d) {
              gr[L.color + d] += w8 * vcp[d];
              v_alpha_c += (r[kRowHead + d] - Sp[d]) * vcp[d];
            }
            const scalar_t v_alpha = h.T * (v_alpha_c - B[p] * bg_dot[p] + B[p] * v_a[p]);
            const scalar_t raw_alpha = r[5] * h.vis;
            if (raw_alpha <= alpha_max) {
              const scalar_t v_sigma = -raw_alpha * v_alpha;
              const scalar_t dx = h.dx, dy = h.dy;
              gr[L.conic] += scalar_t(0.5) * v_sigma * dx * dx;
              gr[L.conic + 1] += v_sigma * dx * dy;
              gr[L.conic + 2] += scalar_t(0.5) * v_sigma * dy * dy;
              const scalar_t gx = v_sigma * (r[2] * dx + r[3] * dy);
              const scalar_t gy = v_sigma * (r[3] * dx + r[4] * dy);
              gr[L.mean] += gx;
              gr[L.mean + 1] += gy;
              if (absgrad) {
                gr[L.abs] += std::abs(gx);
                gr[L.abs + 1] += std::abs(gy);
              }
              gr[L.opacity] += h.vis * v_alpha;
            }
            const scalar_t one_minus = scalar_t(1) - h.alpha;
            for (int64_t d = 0; d < D; ++d) Sp[d] = r[kRowHead + d] * h.alpha + one_minus * Sp[d];
            B[p] *= one_minus;
          }
        }
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
