// Tile intersection of projected Gaussians on the CPU (OpenMP): every (camera, tile, Gaussian)
// intersection sorted by (camera, tile, depth) and each tile's start in that list.
//
// The specification is ms_splatfacto/backend/kernels/reference.py (gsplat 1.4.0 semantics,
// unpacked mode): same tile rectangles, key layout and stable depth order.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

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

TORCH_LIBRARY_FRAGMENT(ms_splatfacto, m) {
  m.def("isect_tiles", &isect_tiles);
  m.def("isect_offset_encode", &isect_offset_encode);
}
