// Tile intersection and tile-based alpha compositing of projected Gaussians on the CPU (OpenMP).
//
// The specification is ms_splatfacto/backend/kernels/reference.py (gsplat 1.4.0 semantics,
// unpacked mode): same tile rectangles, key layout, stable depth order, compositing thresholds
// and output layouts. Gradients are hand-written; see rasterize_to_pixels_bwd below.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;  // a Gaussian below this alpha is skipped at a pixel
constexpr double kAlphaMax = 0.999;        // alpha is clamped to this
constexpr double kTMin = 1e-4;             // stop before transmittance would reach this or below

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

int64_t bit_length(int64_t v) {
  int64_t n = 0;
  for (; v > 0; v >>= 1) ++n;
  return n;
}

// A floored/ceiled tile coordinate converted and clamped to [0, upper] as the reference does
// (`.int().clamp(min=0)` then `minimum(upper)`); NaN gives 0.
template <typename scalar_t>
inline int32_t clamp_tile(scalar_t v, int64_t upper) {
  if (!(v > scalar_t(0))) return 0;
  if (v >= static_cast<scalar_t>(upper)) return static_cast<int32_t>(upper);
  return static_cast<int32_t>(v);
}

// Half-open tile rectangle {x0, y0, x1, y1} of one Gaussian's bounding square. The arithmetic
// mirrors the reference: means / tile_size in the means' dtype, float32(radius) / tile_size in
// float32, then floor/ceil of their difference/sum in the promoted dtype.
template <typename scalar_t>
inline void tile_rect(scalar_t mx, scalar_t my, int32_t radius, int64_t tile_size, int64_t tile_width,
                      int64_t tile_height, int32_t* rect) {
  const scalar_t ts = static_cast<scalar_t>(tile_size);
  const scalar_t tmx = mx / ts;
  const scalar_t tmy = my / ts;
  const scalar_t tr = static_cast<scalar_t>(static_cast<float>(radius) / static_cast<float>(tile_size));
  rect[0] = clamp_tile(std::floor(tmx - tr), tile_width);
  rect[1] = clamp_tile(std::floor(tmy - tr), tile_height);
  rect[2] = clamp_tile(std::ceil(tmx + tr), tile_width);
  rect[3] = clamp_tile(std::ceil(tmy + tr), tile_height);
}

uint32_t float_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// Tile rectangles and tile counts of CN Gaussians; rectangles are empty where radius <= 0.
template <typename scalar_t>
void tile_rects(const scalar_t* means2d, const int32_t* radii, int64_t CN, int64_t tile_size, int64_t tile_width,
                int64_t tile_height, int32_t* rects, int32_t* tiles_per_gauss) {
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < CN; ++g) {
    int32_t* r = &rects[4 * g];
    tile_rect<scalar_t>(means2d[2 * g], means2d[2 * g + 1], radii[g], tile_size, tile_width, tile_height, r);
    if (radii[g] <= 0) r[2] = r[0], r[3] = r[1];
    tiles_per_gauss[g] = (r[2] - r[0]) * (r[3] - r[1]);
  }
}

}  // namespace

// Every (camera, tile, Gaussian) intersection sorted by (camera, tile, depth), ties in emission order.
//
// Parallel counting sort: each chunk of Gaussians counts its intersections per (camera, tile)
// bucket, an exclusive scan over (bucket, chunk) gives every chunk its write position inside each
// bucket (so buckets hold their entries in emission order), and each bucket is then sorted by the
// 64-bit key (depth bits, flat Gaussian index). Within a bucket a Gaussian occurs once and
// emission order is increasing flat index, so that sort equals the reference's stable sort.
std::tuple<at::Tensor, at::Tensor, at::Tensor> isect_tiles(const at::Tensor& means2d_in,  // [C, N, 2]
                                                           const at::Tensor& radii_in,    // [C, N] int32
                                                           const at::Tensor& depths_in,   // [C, N]
                                                           int64_t tile_size, int64_t tile_width,
                                                           int64_t tile_height) {
  check_cpu(means2d_in, "means2d");
  check_cpu(radii_in, "radii");
  check_cpu(depths_in, "depths");
  TORCH_CHECK(radii_in.dim() == 2, "radii must be [C, N], got ", radii_in.sizes());
  const int64_t C = radii_in.size(0), N = radii_in.size(1);
  TORCH_CHECK(means2d_in.dim() == 3 && means2d_in.size(0) == C && means2d_in.size(1) == N && means2d_in.size(2) == 2,
              "means2d must be [C, N, 2] = [", C, ", ", N, ", 2], got ", means2d_in.sizes());
  TORCH_CHECK(depths_in.dim() == 2 && depths_in.size(0) == C && depths_in.size(1) == N,
              "depths must be [C, N] = [", C, ", ", N, "], got ", depths_in.sizes());
  TORCH_CHECK(radii_in.scalar_type() == at::kInt, "radii must be int32, got ", radii_in.scalar_type());
  TORCH_CHECK(tile_size > 0 && tile_width >= 0 && tile_height >= 0, "bad tile grid: tile_size ", tile_size,
              ", tile_width ", tile_width, ", tile_height ", tile_height);
  const int64_t CN = C * N;
  TORCH_CHECK(CN < std::numeric_limits<int32_t>::max(), "C * N = ", CN, " does not fit int32 flatten ids");

  const at::Tensor means2d = means2d_in.detach().contiguous();
  const at::Tensor radii = radii_in.detach().contiguous();
  const at::Tensor depths = depths_in.detach().to(at::kFloat).contiguous();  // key bits are float32's
  const int32_t* radii_p = radii.data_ptr<int32_t>();
  const float* depth_p = depths.data_ptr<float>();

  const int64_t n_tiles = tile_width * tile_height;
  const int64_t tile_bits = bit_length(n_tiles);
  const int64_t n_buckets = C * n_tiles;

  at::Tensor tiles_per_gauss = at::empty({C, N}, radii.options());
  int32_t* tpg = tiles_per_gauss.data_ptr<int32_t>();
  std::vector<int32_t> rects(4 * CN);  // {x0, y0, x1, y1}; empty where radius <= 0
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "isect_tiles", [&] {
    tile_rects<scalar_t>(means2d.data_ptr<scalar_t>(), radii_p, CN, tile_size, tile_width, tile_height, rects.data(),
                         tpg);
  });

  // Chunks of consecutive Gaussians, each with its own histogram (bounded to keep memory sensible).
  const int64_t max_hist_entries = int64_t(1) << 24;
  int64_t n_chunks = std::min<int64_t>(omp_get_max_threads(), std::max<int64_t>(CN, 1));
  n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_chunks, max_hist_entries / std::max<int64_t>(n_buckets, 1)));
  auto chunk_begin = [&](int64_t k) { return CN * k / n_chunks; };
  std::vector<int64_t> cursor(n_chunks * n_buckets, 0);  // counts, then write positions

#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n_chunks; ++k) {
    int64_t* hist = &cursor[k * n_buckets];
    for (int64_t g = chunk_begin(k); g < chunk_begin(k + 1); ++g) {
      const int32_t* r = &rects[4 * g];
      const int64_t base = (g / N) * n_tiles;
      for (int32_t ty = r[1]; ty < r[3]; ++ty)
        for (int32_t tx = r[0]; tx < r[2]; ++tx) ++hist[base + ty * tile_width + tx];
    }
  }
  std::vector<int64_t> bucket_start(n_buckets + 1);
  int64_t running = 0;
  for (int64_t b = 0; b < n_buckets; ++b) {
    bucket_start[b] = running;
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t count = cursor[k * n_buckets + b];
      cursor[k * n_buckets + b] = running;
      running += count;
    }
  }
  bucket_start[n_buckets] = running;
  const int64_t M = running;
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max(), "too many tile intersections (", M, ") for int32 offsets");

  std::vector<uint64_t> keys(M);  // depth bits << 32 | flat Gaussian index
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n_chunks; ++k) {
    int64_t* pos = &cursor[k * n_buckets];
    for (int64_t g = chunk_begin(k); g < chunk_begin(k + 1); ++g) {
      const int32_t* r = &rects[4 * g];
      const int64_t base = (g / N) * n_tiles;
      const uint64_t key = (uint64_t(float_bits(depth_p[g])) << 32) | uint64_t(g);
      for (int32_t ty = r[1]; ty < r[3]; ++ty)
        for (int32_t tx = r[0]; tx < r[2]; ++tx) keys[pos[base + ty * tile_width + tx]++] = key;
    }
  }

  at::Tensor isect_ids = at::empty({M}, radii.options().dtype(at::kLong));
  at::Tensor flatten_ids = at::empty({M}, radii.options());
  int64_t* ids_p = isect_ids.data_ptr<int64_t>();
  int32_t* flat_p = flatten_ids.data_ptr<int32_t>();
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t b = 0; b < n_buckets; ++b) {
    const int64_t lo = bucket_start[b], hi = bucket_start[b + 1];
    if (lo == hi) continue;
    std::sort(keys.begin() + lo, keys.begin() + hi);
    const int64_t high = ((b / n_tiles) << (32 + tile_bits)) | ((b % n_tiles) << 32);
    for (int64_t p = lo; p < hi; ++p) {
      ids_p[p] = high | int64_t(keys[p] >> 32);
      flat_p[p] = int32_t(keys[p] & 0xFFFFFFFFu);
    }
  }
  return {tiles_per_gauss, isect_ids, flatten_ids};
}

// offsets[b] = number of sorted intersections whose (camera, tile) index is below b, i.e. the start
// of tile b's range (searchsorted, left side). Each intersection fills the buckets between its
// predecessor's index and its own, so every bucket is written exactly once.
at::Tensor isect_offset_encode(const at::Tensor& isect_ids_in,  // [M] int64, sorted
                               int64_t n_cameras, int64_t tile_width, int64_t tile_height) {
  check_cpu(isect_ids_in, "isect_ids");
  TORCH_CHECK(isect_ids_in.dim() == 1, "isect_ids must be [M], got ", isect_ids_in.sizes());
  TORCH_CHECK(isect_ids_in.scalar_type() == at::kLong, "isect_ids must be int64, got ", isect_ids_in.scalar_type());
  TORCH_CHECK(n_cameras >= 0 && tile_width >= 0 && tile_height >= 0, "bad sizes: n_cameras ", n_cameras,
              ", tile_width ", tile_width, ", tile_height ", tile_height);
  const at::Tensor isect_ids = isect_ids_in.contiguous();
  const int64_t M = isect_ids.size(0);
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max(), "too many intersections (", M, ") for int32 offsets");
  const int64_t n_tiles = tile_width * tile_height;
  const int64_t tile_bits = bit_length(n_tiles);
  const int64_t total = n_cameras * n_tiles;
  const int64_t* ids = isect_ids.data_ptr<int64_t>();
  at::Tensor offsets = at::empty({n_cameras, tile_height, tile_width}, isect_ids.options().dtype(at::kInt));
  int32_t* out = offsets.data_ptr<int32_t>();
  auto linear = [&](int64_t i) {
    const int64_t key = ids[i] >> 32;
    return (key >> tile_bits) * n_tiles + (key & ((int64_t(1) << tile_bits) - 1));
  };
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i <= M; ++i) {
    const int64_t prev = i == 0 ? -1 : linear(i - 1);
    const int64_t cur = i == M ? total : linear(i);
    const int64_t lo = std::max<int64_t>(prev + 1, 0), hi = std::min<int64_t>(cur, total - 1);
    for (int64_t b = lo; b <= hi; ++b) out[b] = int32_t(i);
  }
  return offsets;
}

namespace {

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
  for (int64_t k = 0; k < len; ++k) {
    const int64_t g = ids[start + k];
    scalar_t* r = &rows[k * stride];
    r[0] = m[2 * g], r[1] = m[2 * g + 1];
    r[2] = q[3 * g], r[3] = q[3 * g + 1], r[4] = q[3 * g + 2];
    r[5] = op[g];
    reach_box(r);
    for (int64_t d = 0; d < D; ++d) r[kRowHead + d] = col[D * g + d];
  }
}

// Evaluates one Gaussian row at pixel centre (px, py); false where the reference skips it
// (sigma < 0 or alpha < 1/255). Forward and backward share it so they take the same decisions.
template <typename scalar_t>
inline bool evaluate(const scalar_t* r, scalar_t px, scalar_t py, scalar_t& dx, scalar_t& dy, scalar_t& vis,
                     scalar_t& alpha) {
  dx = r[0] - px;
  dy = r[1] - py;
  const scalar_t sigma = scalar_t(0.5) * (r[2] * (dx * dx) + r[4] * (dy * dy)) + r[3] * dx * dy;
  if (!(sigma >= scalar_t(0))) return false;
  vis = std::exp(-sigma);
  const scalar_t raw = r[5] * vis;
  alpha = raw > static_cast<scalar_t>(kAlphaMax) ? static_cast<scalar_t>(kAlphaMax) : raw;  // NaN stays NaN
  return alpha >= static_cast<scalar_t>(kAlphaMin);
}

// Pixels [s, e) within [a, b) whose centre x + 0.5 may lie in [lo, hi], with one pixel of slack
// (the box is only a shortcut; `evaluate` decides). NaN bounds give the whole range.
inline void pixel_span(double lo, double hi, int64_t a, int64_t b, int64_t& s, int64_t& e) {
  const double fs = std::floor(lo - 0.5), fe = std::ceil(hi - 0.5) + 1.0;
  s = fs > double(a) ? (fs < double(b) ? int64_t(fs) : b) : a;
  e = fe < double(b) ? (fe > double(a) ? int64_t(fe) : a) : b;
}

// Front-to-back compositing of one tile's pixels [x0, x1) x [y0, y1), Gaussian by Gaussian: each
// Gaussian visits only the pixels of its reach box, and every pixel still meets its Gaussians in
// list order, so the result is that of a per-pixel walk. A pixel stops before the Gaussian that
// would bring its transmittance to <= 1e-4, or (backward pass) at list row limit[p].
// on_hit(p, k, r, dx, dy, vis, alpha, T_before) is called for every composited pair; T[p] ends
// as pixel p's final transmittance.
template <typename scalar_t, typename OnHit>
void sweep_tile(const std::vector<scalar_t>& rows, int64_t stride, int64_t len, int64_t x0, int64_t y0, int64_t x1,
                int64_t y1, const int64_t* limit, std::vector<scalar_t>& T, std::vector<uint8_t>& done,
                OnHit&& on_hit) {
  const int64_t tw = x1 - x0, n_pixels = tw * (y1 - y0);
  const scalar_t t_min = static_cast<scalar_t>(kTMin);
  T.assign(n_pixels, scalar_t(1));
  done.assign(n_pixels, 0);
  int64_t active = n_pixels;
  for (int64_t k = 0; k < len && active > 0; ++k) {
    const scalar_t* r = &rows[k * stride];
    int64_t xs, xe, ys, ye;
    pixel_span(r[6], r[7], x0, x1, xs, xe);
    pixel_span(r[8], r[9], y0, y1, ys, ye);
    for (int64_t y = ys; y < ye; ++y) {
      const scalar_t py = static_cast<scalar_t>(y) + scalar_t(0.5);
      for (int64_t x = xs; x < xe; ++x) {
        const int64_t p = (y - y0) * tw + (x - x0);
        if (done[p]) continue;
        if (limit && k >= limit[p]) {
          done[p] = 1, --active;
          continue;
        }
        const scalar_t px = static_cast<scalar_t>(x) + scalar_t(0.5);
        scalar_t dx, dy, vis, alpha;
        if (!evaluate(r, px, py, dx, dy, vis, alpha)) continue;
        const scalar_t next_T = T[p] * (scalar_t(1) - alpha);
        if (!(next_T > t_min)) {
          done[p] = 1, --active;
          continue;
        }
        on_hit(p, k, r, dx, dy, vis, alpha, T[p]);
        T[p] = next_T;
      }
    }
  }
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
    std::vector<scalar_t> rows, T, acc;
    std::vector<uint8_t> done;
    std::vector<int64_t> last;
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < n_total; ++t) {
      const TileWork w = tile_work(offsets, t, n_tiles, n_total, tw, tile_size, width, height, M);
      if (w.empty()) continue;
      const int64_t cam = w.cam, x0 = w.x0, y0 = w.y0, x1 = w.x1, y1 = w.y1, start = w.start;
      const int64_t len = w.end - start, n_pixels = w.n_pixels();
      gather_tile(in, start, len, rows);
      acc.assign(n_pixels * D, scalar_t(0));
      last.assign(n_pixels, -1);
      sweep_tile(rows, stride, len, x0, y0, x1, y1, nullptr, T, done,
                 [&](int64_t p, int64_t k, const scalar_t* r, scalar_t, scalar_t, scalar_t, scalar_t alpha,
                     scalar_t T_before) {
                   const scalar_t w = alpha * T_before;
                   for (int64_t d = 0; d < D; ++d) acc[p * D + d] += r[kRowHead + d] * w;
                   last[p] = k;
                 });
      for (int64_t y = y0, p = 0; y < y1; ++y) {
        for (int64_t x = x0; x < x1; ++x, ++p) {
          const int64_t pix = (cam * height + y) * width + x;
          for (int64_t d = 0; d < D; ++d) {
            out_c[pix * D + d] = bg ? acc[p * D + d] + T[p] * bg[cam * D + d] : acc[p * D + d];
          }
          out_a[pix] = scalar_t(1) - T[p];
          out_last[pix] = last[p] < 0 ? -1 : static_cast<int32_t>(start + last[p]);
        }
      }
    }
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

// One composited Gaussian of a pixel, recorded while the backward pass re-runs the forward sweep.
template <typename scalar_t>
struct Hit {
  int64_t k;  // row in the tile's gathered list
  scalar_t dx, dy, vis, alpha, T;  // T: transmittance in front of this Gaussian
};

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
// Per-Gaussian sums: each tile accumulates into its own rows, which are then added to the
// thread's float64 buffer; tiles go round-robin to threads (static schedule), and the thread buffers
// are summed in thread order. The float64 sums make the result independent of how tiles are
// partitioned (threads, or members of an aggregate device) up to rounding far below float32's.
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

  const int64_t max_threads = omp_get_max_threads();
  at::Tensor buffers = at::zeros({max_threads, CN, K}, in.colors.options().dtype(at::kDouble));
  at::Tensor bg_buffers = at::zeros({max_threads, C, D}, in.colors.options());
  int64_t n_threads = 1;

#pragma omp parallel
  {
    const int64_t tid = omp_get_thread_num();
#pragma omp single
    n_threads = omp_get_num_threads();
    double* buf = buffers.data_ptr<double>() + tid * CN * K;
    scalar_t* bg_buf = bg_buffers.data_ptr<scalar_t>() + tid * C * D;
    std::vector<scalar_t> rows, tile_grad, T, S(D), v_c(D);
    std::vector<uint8_t> done;
    std::vector<int64_t> limit;
    std::vector<std::vector<Hit<scalar_t>>> hits(tile_size * tile_size);
#pragma omp for schedule(static, 1)
    for (int64_t t = 0; t < n_total; ++t) {
      const TileWork w = tile_work(offsets, t, n_tiles, n_total, tw, tile_size, width, height, M);
      if (w.empty()) continue;
      const int64_t cam = w.cam, x0 = w.x0, y0 = w.y0, x1 = w.x1, y1 = w.y1, start = w.start, end = w.end;
      const int64_t n_pixels = w.n_pixels();
      // Re-run the forward sweep up to each pixel's last composited row, recording the hits.
      limit.resize(n_pixels);
      int64_t len = 0;
      for (int64_t y = y0, p = 0; y < y1; ++y) {
        for (int64_t x = x0; x < x1; ++x, ++p) {
          const int64_t last = last_p[(cam * height + y) * width + x];
          limit[p] = std::min<int64_t>(std::max<int64_t>(last + 1, start), end) - start;
          len = std::max(len, limit[p]);
          hits[p].clear();
        }
      }
      gather_tile(in, start, len, rows);
      tile_grad.assign(len * K, scalar_t(0));
      sweep_tile(rows, stride, len, x0, y0, x1, y1, limit.data(), T, done,
                 [&](int64_t p, int64_t k, const scalar_t*, scalar_t dx, scalar_t dy, scalar_t vis, scalar_t alpha,
                     scalar_t T_before) { hits[p].push_back({k, dx, dy, vis, alpha, T_before}); });
      // Back to front, per pixel.
      for (int64_t y = y0, p = 0; y < y1; ++y) {
        for (int64_t x = x0; x < x1; ++x, ++p) {
          const int64_t pix = (cam * height + y) * width + x;
          scalar_t bg_dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            v_c[d] = vc[pix * D + d];
            bg_buf[cam * D + d] += T[p] * v_c[d];
            if (bg) bg_dot += bg[cam * D + d] * v_c[d];
          }
          const scalar_t v_a = va[pix];
          std::fill(S.begin(), S.end(), scalar_t(0));
          scalar_t B = 1;
          for (auto h = hits[p].rbegin(); h != hits[p].rend(); ++h) {
            const scalar_t* r = &rows[h->k * stride];
            scalar_t* gr = &tile_grad[h->k * K];
            const scalar_t w = h->alpha * h->T;
            scalar_t v_alpha_c = 0;
            for (int64_t d = 0; d < D; ++d) {
              gr[L.color + d] += w * v_c[d];
              v_alpha_c += (r[kRowHead + d] - S[d]) * v_c[d];
            }
            const scalar_t v_alpha = h->T * (v_alpha_c - B * bg_dot + B * v_a);
            const scalar_t raw_alpha = r[5] * h->vis;
            if (raw_alpha <= alpha_max) {
              const scalar_t v_sigma = -raw_alpha * v_alpha;
              const scalar_t dx = h->dx, dy = h->dy;
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
              gr[L.opacity] += h->vis * v_alpha;
            }
            const scalar_t one_minus = scalar_t(1) - h->alpha;
            for (int64_t d = 0; d < D; ++d) S[d] = r[kRowHead + d] * h->alpha + one_minus * S[d];
            B *= one_minus;
          }
        }
      }
      for (int64_t k = 0; k < len; ++k) {
        double* dst = buf + int64_t(flat[start + k]) * K;
        const scalar_t* src = &tile_grad[k * K];
        for (int64_t j = 0; j < K; ++j) dst[j] += src[j];
      }
    }
  }

  const double* bufs = buffers.data_ptr<double>();
  double* out = sums.data_ptr<double>();
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < CN; ++g) {
    double* sum = out + g * K;
    std::fill(sum, sum + K, 0.0);
    for (int64_t th = 0; th < n_threads; ++th) {
      const double* src = bufs + (th * CN + g) * K;
      for (int64_t j = 0; j < K; ++j) sum[j] += src[j];
    }
  }
  v_backgrounds.copy_(bg_buffers.narrow(0, 0, n_threads).sum(0));
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

TORCH_LIBRARY_FRAGMENT(ms_splatfacto, m) {
  m.def("isect_tiles", &isect_tiles);
  m.def("isect_offset_encode", &isect_offset_encode);
  m.def("rasterize_to_pixels_fwd", &rasterize_to_pixels_fwd);
  m.def("rasterize_to_pixels_bwd", &rasterize_to_pixels_bwd);
}
