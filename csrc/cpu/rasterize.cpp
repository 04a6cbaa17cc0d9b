// Tile-based alpha compositing of projected Gaussians on the CPU (OpenMP, SIMD over pixels), forward
// pass; the tile lists come from isect.cpp, the shared gather and compositing step from raster_common.h,
// the backward pass is in rasterize_bwd.cpp.
//
// The specification is ms_splatfacto/backend/kernels/reference.py (gsplat 1.4.0 semantics,
// unpacked mode): same compositing thresholds and output layouts.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "raster_common.h"

using namespace msplat_raster;

namespace {

// Forward compositing of one tile (gathered rows, lists built), vector by vector: each vector's
// transmittance, colours and last row stay in registers while it walks its Gaussians in list order,
// until every lane has finished. DC: the colour channels at compile time (0: D at run time).
//
// The walk goes by mask words of 32 rows: kept_rows computes each row's exponent at the vector and
// keeps, without a branch, the rows where some lane still compositing is within sigma_cut =
// log(255 opacity) (widened; elsewhere nothing composites and nothing ends); a second loop composites
// the kept rows in order. So the decisions are those of a walk over every row, and only the kept rows
// count as evaluations.
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
  alignas(64) V sig[32];
  int32_t kept[32];
  I8 tried{};
  int64_t lanes = 0;
  for (int64_t v = 0; v < s.nv; ++v) {
    const PixelVector<scalar_t> pv(w, s.vpr, v);
    V T = splat<V>(scalar_t(1));
    M alive = pv.inside;
    I8 last = splat<I8>(-1);
    for (int64_t d = 0; d < D; ++d) acc[d] = V{};
    for (int64_t k0 = 0; k0 < s.len_pad && any(alive); k0 += 32) {
      const int n = kept_rows(s, stride, pv, v, k0, alive, sig, kept);
      for (int i = 0; i < n; ++i) {
        const int32_t k = kept[i];
        const scalar_t* r = &s.rows[k * stride];
        tally(tried, alive);
        Step<scalar_t> st;
        st.composite(sig[i], r[5], ~M{}, T, alive);
        lanes += kLanes;
        const V wv = st.h ? st.alpha * st.T_before : V{};  // 0 where not composited: acc unchanged
        for (int64_t d = 0; d < D; ++d) acc[d] = fmadd(splat<V>(r[kRowHead + d]), wv, acc[d]);
        last = __builtin_convertvector(st.h, I8) ? splat<I8>(k) : last;
        if (!any(alive)) break;
      }
    }
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
}
