// Backward pass of the CPU rasterizer (rasterize.cpp): hand-written gradients of the front-to-back
// compositing, replaying the forward's decisions through the shared step of raster_common.h.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "raster_common.h"

using namespace msplat_raster;

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
  alignas(64) V sig[32];
  int32_t kept[32];
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
    // Replay front to back, by mask words of 32 rows as in the forward: a first loop keeps, without a
    // branch, the rows where a lane still compositing and before its limit is within sigma_cut; the
    // second composites them and keeps the hits (h, vis, T in front), also without a branch.
    V T = splat<V>(scalar_t(1));
    M alive = pv.inside;
    int64_t n_hits = 0;
    for (int64_t k0 = 0; k0 < s.len_pad; k0 += 32) {
      alive &= __builtin_convertvector(splat<I8>(static_cast<int32_t>(k0)) < limit, M);  // limits passed
      if (!any(alive)) break;
      const int n = kept_rows(s, stride, pv, v, k0, alive, sig, kept);
      for (int i = 0; i < n; ++i) {
        const int32_t k = kept[i];
        const M open = __builtin_convertvector(splat<I8>(k) < limit, M);
        tally(tried, alive);
        Step<scalar_t> st;
        st.composite(sig[i], s.rows[k * stride + 5], open, T, alive);
        lanes += kLanes;
        s.hit_k[n_hits] = k, s.hit_h[n_hits] = st.h, s.hit_vis[n_hits] = st.vis, s.hit_T[n_hits] = st.T_before;
        n_hits += any(st.h);
        if (!any(alive)) break;
      }
    }
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

TORCH_LIBRARY_FRAGMENT(ms_splatfacto, m) {
  m.def("rasterize_to_pixels_bwd", &rasterize_to_pixels_bwd);
}
