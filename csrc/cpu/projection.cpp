// CPU (OpenMP) kernels for EWA projection of 3D Gaussians and spherical-harmonics colours.
//
// The specification is ms_splatfacto/backend/kernels/reference.py (`project`, `spherical_harmonics`):
// the forward passes follow its arithmetic (same culling, same clamped Jacobian) and the backward
// passes are hand-written vector-Jacobian products of exactly that computation, i.e. they reproduce
// the reference's autograd gradients (including the exact derivative of the compensation factor).
//
// Ops (torch.ops.ms_splatfacto.*):
//   project_fwd, project_bwd, sh_fwd, sh_bwd
//
// Determinism: every backward is parallelised over Gaussians with an inner loop over cameras, so each
// thread owns the rows it writes; no atomics, results do not depend on the thread count.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's default eps

// ---------------------------------------------------------------------------------------------
// Small dense helpers (row-major 3x3).
// ---------------------------------------------------------------------------------------------

template <typename T>
inline void matmul3(const T a[3][3], const T b[3][3], T out[3][3]) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) out[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j];
}

// out = a * b^T
template <typename T>
inline void matmul3_bt(const T a[3][3], const T b[3][3], T out[3][3]) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) out[i][j] = a[i][0] * b[j][0] + a[i][1] * b[j][1] + a[i][2] * b[j][2];
}

// out = a^T * b
template <typename T>
inline void matmul3_at(const T a[3][3], const T b[3][3], T out[3][3]) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) out[i][j] = a[0][i] * b[0][j] + a[1][i] * b[1][j] + a[2][i] * b[2][j];
}

// VJP of u = v / max(|v|, eps) (F.normalize), for a vector of length D.
template <typename T, int D>
inline void normalize_vjp(const T* v, const T* v_u, T* v_v) {
  T sq = 0;
  for (int i = 0; i < D; ++i) sq += v[i] * v[i];
  const T norm = std::sqrt(sq);
  if (norm >= T(kNormalizeEps)) {
    // d(v / |v|) = (I - u u^T) / |v|
    T dot = 0;
    for (int i = 0; i < D; ++i) dot += v[i] * v_u[i];
    const T inv = T(1) / norm;
    for (int i = 0; i < D; ++i) v_v[i] = (v_u[i] - v[i] * inv * inv * dot) * inv;
  } else {  // the clamp is active: the denominator is a constant
    for (int i = 0; i < D; ++i) v_v[i] = v_u[i] / T(kNormalizeEps);
  }
}

// ---------------------------------------------------------------------------------------------
// Projection.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Camera {
  T R[3][3];
  T t[3];
  T fx, fy, cx, cy;
  T lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;
};

template <typename T>
std::vector<Camera<T>> load_cameras(const at::Tensor& viewmats, const at::Tensor& Ks, int64_t width, int64_t height) {
  const int64_t C = viewmats.size(0);
  const T* vm = viewmats.data_ptr<T>();
  const T* k = Ks.data_ptr<T>();
  std::vector<Camera<T>> cams(C);
  for (int64_t c = 0; c < C; ++c) {
    Camera<T>& cam = cams[c];
    const T* V = vm + c * 16;
    const T* K = k + c * 9;
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) cam.R[i][j] = V[i * 4 + j];
      cam.t[i] = V[i * 4 + 3];
    }
    cam.fx = K[0];
    cam.fy = K[4];
    cam.cx = K[2];
    cam.cy = K[5];
    // The Jacobian is evaluated at a point clamped to the frustum enlarged by 30% of the half-FOV.
    const T tan_fovx = T(0.5 * double(width)) / cam.fx;
    const T tan_fovy = T(0.5 * double(height)) / cam.fy;
    cam.lim_x_pos = (T(width) - cam.cx) / cam.fx + T(0.3) * tan_fovx;
    cam.lim_x_neg = cam.cx / cam.fx + T(0.3) * tan_fovx;
    cam.lim_y_pos = (T(height) - cam.cy) / cam.fy + T(0.3) * tan_fovy;
    cam.lim_y_neg = cam.cy / cam.fy + T(0.3) * tan_fovy;
  }
  return cams;
}

// Per-Gaussian world-space quantities (shared by all cameras).
template <typename T>
struct WorldGaussian {
  T mean[3];
  T q[4];      // raw quaternion (w, x, y, z)
  T qn[4];     // normalised quaternion
  T Rq[3][3];  // rotation
  T M[3][3];   // R * diag(scales)
  T cov[3][3]; // M M^T
  T s[3];
};

template <typename T>
inline void load_world_gaussian(const T* means, const T* quats, const T* scales, int64_t n, WorldGaussian<T>& g) {
  for (int i = 0; i < 3; ++i) {
    g.mean[i] = means[n * 3 + i];
    g.s[i] = scales[n * 3 + i];
  }
  T sq = 0;
  for (int i = 0; i < 4; ++i) {
    g.q[i] = quats[n * 4 + i];
    sq += g.q[i] * g.q[i];
  }
  const T denom = std::max(std::sqrt(sq), T(kNormalizeEps));
  for (int i = 0; i < 4; ++i) g.qn[i] = g.q[i] / denom;
  const T w = g.qn[0], x = g.qn[1], y = g.qn[2], z = g.qn[3];
  g.Rq[0][0] = T(1) - T(2) * (y * y + z * z);
  g.Rq[0][1] = T(2) * (x * y - w * z);
  g.Rq[0][2] = T(2) * (x * z + w * y);
  g.Rq[1][0] = T(2) * (x * y + w * z);
  g.Rq[1][1] = T(1) - T(2) * (x * x + z * z);
  g.Rq[1][2] = T(2) * (y * z - w * x);
  g.Rq[2][0] = T(2) * (x * z - w * y);
  g.Rq[2][1] = T(2) * (y * z + w * x);
  g.Rq[2][2] = T(1) - T(2) * (x * x + y * y);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) g.M[i][j] = g.Rq[i][j] * g.s[j];
  matmul3_bt(g.M, g.M, g.cov);
}

// Everything the forward computes for one (camera, Gaussian) pair; the backward recomputes it.
template <typename T>
struct Projected {
  T mc[3];       // mean in camera space
  T covc[3][3];  // covariance in camera space
  T tz;          // depth used by the Jacobian (valid entries only)
  T u, v;        // tx / tz, ty / tz
  T uc, vc;      // clamped
  bool pass_x, pass_y;  // clamp inactive (gradient passes)
  T J00, J02, J11, J12;
  T JS[2][3];    // J * covc
  T a0, b0, c0;  // 2D covariance before blur
  T a, c;        // blurred diagonal
  T det_orig, det;
  T mean2d[2];
  T conic[3];
  int32_t radius;
  bool valid;
  bool comp_valid;  // compensation is nonzero and differentiable
  T comp;
};

template <typename T>
inline void project_one(const Camera<T>& cam, const WorldGaussian<T>& g, int64_t width, int64_t height, T eps2d,
                        T near_plane, T far_plane, T radius_clip, Projected<T>& p) {
  for (int i = 0; i < 3; ++i)
    p.mc[i] = cam.R[i][0] * g.mean[0] + cam.R[i][1] * g.mean[1] + cam.R[i][2] * g.mean[2] + cam.t[i];
  p.valid = false;
  p.comp_valid = false;
  p.radius = 0;
  const T tx = p.mc[0], ty = p.mc[1], tz = p.mc[2];
  if (!(tz > near_plane && tz < far_plane)) return;
  p.tz = tz;

  T tmp[3][3];
  matmul3(cam.R, g.cov, tmp);
  matmul3_bt(tmp, cam.R, p.covc);

  p.u = tx / tz;
  p.v = ty / tz;
  p.uc = std::min(std::max(p.u, -cam.lim_x_neg), cam.lim_x_pos);
  p.vc = std::min(std::max(p.v, -cam.lim_y_neg), cam.lim_y_pos);
  p.pass_x = p.u >= -cam.lim_x_neg && p.u <= cam.lim_x_pos;
  p.pass_y = p.v >= -cam.lim_y_neg && p.v <= cam.lim_y_pos;
  const T txc = tz * p.uc, tyc = tz * p.vc;
  const T tz2 = tz * tz;
  p.J00 = cam.fx / tz;
  p.J02 = -cam.fx * txc / tz2;
  p.J11 = cam.fy / tz;
  p.J12 = -cam.fy * tyc / tz2;

  // cov2d = (J covc) J^T, J = [[J00, 0, J02], [0, J11, J12]]
  for (int k = 0; k < 3; ++k) {
    p.JS[0][k] = p.J00 * p.covc[0][k] + p.J02 * p.covc[2][k];
    p.JS[1][k] = p.J11 * p.covc[1][k] + p.J12 * p.covc[2][k];
  }
  p.a0 = p.JS[0][0] * p.J00 + p.JS[0][2] * p.J02;
  const T c01 = p.JS[0][1] * p.J11 + p.JS[0][2] * p.J12;
  const T c10 = p.JS[1][0] * p.J00 + p.JS[1][2] * p.J02;
  p.c0 = p.JS[1][1] * p.J11 + p.JS[1][2] * p.J12;
  p.b0 = T(0.5) * (c01 + c10);

  p.mean2d[0] = cam.fx * tx / tz + cam.cx;
  p.mean2d[1] = cam.fy * ty / tz + cam.cy;

  const T b = p.b0;
  p.det_orig = p.a0 * p.c0 - b * b;
  p.a = p.a0 + eps2d;
  p.c = p.c0 + eps2d;
  p.det = p.a * p.c - b * b;
  if (!(p.det > T(0))) return;

  const T mid = T(0.5) * (p.a + p.c);
  const T radius = std::ceil(T(3) * std::sqrt(mid + std::sqrt(std::max(mid * mid - p.det, T(0.01)))));
  if (!(radius > radius_clip)) return;
  if (!(p.mean2d[0] + radius > T(0) && p.mean2d[0] - radius < T(width))) return;
  if (!(p.mean2d[1] + radius > T(0) && p.mean2d[1] - radius < T(height))) return;

  p.valid = true;
  p.radius = static_cast<int32_t>(radius);
  p.conic[0] = p.c / p.det;
  p.conic[1] = -b / p.det;
  p.conic[2] = p.a / p.det;
  if (p.det_orig > T(0)) {
    const T ratio = std::max(p.det_orig / p.det, T(0));
    // A ratio that underflows to 0 is replaced by 1 in the reference (finite sqrt gradient).
    p.comp_valid = ratio > T(0);
    p.comp = std::sqrt(p.comp_valid ? ratio : T(1));
  } else {
    p.comp = T(0);
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ms_splatfacto CPU kernels: `", name, "` must be a CPU tensor, got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "ms_splatfacto CPU kernels: `", name, "` must have shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

void check_projection_inputs(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                             const at::Tensor& viewmats, const at::Tensor& Ks, int64_t width, int64_t height) {
  check_cpu(means, "means");
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "project: `means` must have shape [N, 3], got ", means.sizes());
  TORCH_CHECK(viewmats.dim() == 3, "project: `viewmats` must have shape [C, 4, 4], got ", viewmats.sizes());
  const int64_t N = means.size(0), C = viewmats.size(0);
  check_shape(quats, "quats", {N, 4});
  check_shape(scales, "scales", {N, 3});
  check_shape(viewmats, "viewmats", {C, 4, 4});
  check_shape(Ks, "Ks", {C, 3, 3});
  TORCH_CHECK(width > 0 && height > 0, "project: width and height must be positive, got ", width, "x", height);
  const auto dt = means.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt), "project: `means` must be floating point, got ", dt);
  TORCH_CHECK(quats.scalar_type() == dt && scales.scalar_type() == dt && viewmats.scalar_type() == dt &&
                  Ks.scalar_type() == dt,
              "project: means, quats, scales, viewmats and Ks must share one dtype (means is ", dt, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> project_fwd(
    const at::Tensor& means_in, const at::Tensor& quats_in, const at::Tensor& scales_in,
    const at::Tensor& viewmats_in, const at::Tensor& Ks_in, int64_t width, int64_t height, double eps2d,
    double near_plane, double far_plane, double radius_clip, bool calc_compensations) {
  check_projection_inputs(means_in, quats_in, scales_in, viewmats_in, Ks_in, width, height);
  const at::Tensor means = means_in.contiguous(), quats = quats_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor viewmats = viewmats_in.contiguous(), Ks = Ks_in.contiguous();
  const int64_t N = means.size(0), C = viewmats.size(0);
  const auto opts = means.options();
  at::Tensor radii = at::zeros({C, N}, opts.dtype(at::kInt));
  at::Tensor means2d = at::zeros({C, N, 2}, opts);
  at::Tensor depths = at::zeros({C, N}, opts);
  at::Tensor conics = at::zeros({C, N, 3}, opts);
  at::Tensor comps = calc_compensations ? at::zeros({C, N}, opts) : at::empty({0}, opts);

  // The OpenMP pragma cannot sit inside a macro argument, hence the generic lambda.
  auto kernel = [&](auto zero) {
    using T = decltype(zero);
    const auto cams = load_cameras<T>(viewmats, Ks, width, height);
    const T* p_means = means.data_ptr<T>();
    const T* p_quats = quats.data_ptr<T>();
    const T* p_scales = scales.data_ptr<T>();
    int32_t* p_radii = radii.data_ptr<int32_t>();
    T* p_means2d = means2d.data_ptr<T>();
    T* p_depths = depths.data_ptr<T>();
    T* p_conics = conics.data_ptr<T>();
    T* p_comps = calc_compensations ? comps.data_ptr<T>() : nullptr;
    const T eps = T(eps2d), near_t = T(near_plane), far_t = T(far_plane), clip = T(radius_clip);

#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      WorldGaussian<T> g;
      load_world_gaussian(p_means, p_quats, p_scales, n, g);
      for (int64_t c = 0; c < C; ++c) {
        Projected<T> p;
        project_one(cams[c], g, width, height, eps, near_t, far_t, clip, p);
        if (!p.valid) continue;  // outputs stay zero
        const int64_t i = c * N + n;
        p_radii[i] = p.radius;
        p_means2d[i * 2 + 0] = p.mean2d[0];
        p_means2d[i * 2 + 1] = p.mean2d[1];
        p_depths[i] = p.mc[2];
        p_conics[i * 3 + 0] = p.conic[0];
        p_conics[i * 3 + 1] = p.conic[1];
        p_conics[i * 3 + 2] = p.conic[2];
        if (p_comps) p_comps[i] = p.comp;
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_fwd", [&] { kernel(scalar_t(0)); });
  return {radii, means2d, depths, conics, comps};
}

// Gradients of means, quats and scales (summed over cameras). Validity comes from `radii` (as
// returned by project_fwd with the same inputs); culled entries contribute nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> project_bwd(
    const at::Tensor& means_in, const at::Tensor& quats_in, const at::Tensor& scales_in,
    const at::Tensor& viewmats_in, const at::Tensor& Ks_in, int64_t width, int64_t height, double eps2d,
    const at::Tensor& radii_in, const at::Tensor& v_means2d_in, const at::Tensor& v_depths_in,
    const at::Tensor& v_conics_in, const std::optional<at::Tensor>& v_comps_in) {
  check_projection_inputs(means_in, quats_in, scales_in, viewmats_in, Ks_in, width, height);
  const int64_t N = means_in.size(0), C = viewmats_in.size(0);
  check_shape(radii_in, "radii", {C, N});
  check_shape(v_means2d_in, "v_means2d", {C, N, 2});
  check_shape(v_depths_in, "v_depths", {C, N});
  check_shape(v_conics_in, "v_conics", {C, N, 3});
  const bool has_comp = v_comps_in.has_value() && v_comps_in->defined();
  if (has_comp) check_shape(*v_comps_in, "v_compensations", {C, N});

  const auto dt = means_in.scalar_type();
  const at::Tensor means = means_in.contiguous(), quats = quats_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor viewmats = viewmats_in.contiguous(), Ks = Ks_in.contiguous();
  const at::Tensor radii = radii_in.to(at::kInt).contiguous();
  const at::Tensor v_means2d = v_means2d_in.to(dt).contiguous();
  const at::Tensor v_depths = v_depths_in.to(dt).contiguous();
  const at::Tensor v_conics = v_conics_in.to(dt).contiguous();
  const at::Tensor v_comps = has_comp ? v_comps_in->to(dt).contiguous() : at::Tensor();

  at::Tensor v_means = at::zeros({N, 3}, means.options());
  at::Tensor v_quats = at::zeros({N, 4}, means.options());
  at::Tensor v_scales = at::zeros({N, 3}, means.options());

  // The OpenMP pragma cannot sit inside a macro argument, hence the generic lambda.
  auto kernel = [&](auto zero) {
    using T = decltype(zero);
    const auto cams = load_cameras<T>(viewmats, Ks, width, height);
    const T* p_means = means.data_ptr<T>();
    const T* p_quats = quats.data_ptr<T>();
    const T* p_scales = scales.data_ptr<T>();
    const int32_t* p_radii = radii.data_ptr<int32_t>();
    const T* p_vm2d = v_means2d.data_ptr<T>();
    const T* p_vdep = v_depths.data_ptr<T>();
    const T* p_vcon = v_conics.data_ptr<T>();
    const T* p_vcomp = has_comp ? v_comps.data_ptr<T>() : nullptr;
    T* o_means = v_means.data_ptr<T>();
    T* o_quats = v_quats.data_ptr<T>();
    T* o_scales = v_scales.data_ptr<T>();
    const T eps = T(eps2d);
    // Culling is read from radii, so the bounds below only need to let every valid entry through.
    const T inf = std::numeric_limits<T>::infinity();

#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      WorldGaussian<T> g;
      load_world_gaussian(p_means, p_quats, p_scales, n, g);
      T v_mean[3] = {0, 0, 0};
      T v_cov[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};  // world covariance
      bool any = false;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = c * N + n;
        if (p_radii[i] <= 0) continue;
        const Camera<T>& cam = cams[c];
        Projected<T> p;
        project_one(cam, g, width, height, eps, -inf, inf, -inf, p);
        if (!p.valid) continue;  // same arithmetic as the forward, so this only guards foreign radii
        any = true;
        const T tz = p.tz, tx = p.mc[0], ty = p.mc[1];
        const T b = p.b0, det = p.det, det2 = det * det;

        // Conics: (c / det, -b / det, a / det) with det = a c - b^2 (a, c blurred).
        const T g0 = p_vcon[i * 3 + 0], g1 = p_vcon[i * 3 + 1], g2 = p_vcon[i * 3 + 2];
        T v_a = g0 * (-p.c * p.c / det2) + g1 * (b * p.c / det2) + g2 * (T(1) / det - p.a * p.c / det2);
        T v_b = g0 * (T(2) * b * p.c / det2) + g1 * (-T(1) / det - T(2) * b * b / det2) + g2 * (T(2) * p.a * b / det2);
        T v_c = g0 * (T(1) / det - p.a * p.c / det2) + g1 * (b * p.a / det2) + g2 * (-p.a * p.a / det2);

        // Compensation sqrt(det_orig / det): exact derivative (zero where it is clamped).
        if (p_vcomp && p.comp_valid) {
          const T gr = p_vcomp[i] * T(0.5) / p.comp;  // d/d(ratio)
          const T gdo = gr / det;                     // d/d(det_orig)
          const T gd = -gr * p.det_orig / det2;       // d/d(det)
          v_a += gdo * p.c0 + gd * p.c;
          v_c += gdo * p.a0 + gd * p.a;
          v_b += (gdo + gd) * (-T(2) * b);
        }

        // cov2d = J covc J^T; the off-diagonal entries each get half of b's gradient.
        const T V[2][2] = {{v_a, T(0.5) * v_b}, {T(0.5) * v_b, v_c}};
        const T J[2][3] = {{p.J00, T(0), p.J02}, {T(0), p.J11, p.J12}};
        // v_covc = J^T V J
        T VJ[2][3];
        for (int r = 0; r < 2; ++r)
          for (int k = 0; k < 3; ++k) VJ[r][k] = V[r][0] * J[0][k] + V[r][1] * J[1][k];
        T v_covc[3][3];
        for (int k = 0; k < 3; ++k)
          for (int l = 0; l < 3; ++l) v_covc[k][l] = J[0][k] * VJ[0][l] + J[1][k] * VJ[1][l];
        // v_J = V (J covc) + (V J) covc^T
        T v_J[2][3];
        for (int r = 0; r < 2; ++r)
          for (int k = 0; k < 3; ++k)
            v_J[r][k] = V[r][0] * p.JS[0][k] + V[r][1] * p.JS[1][k] + VJ[r][0] * p.covc[k][0] +
                        VJ[r][1] * p.covc[k][1] + VJ[r][2] * p.covc[k][2];

        // J00 = fx / tz, J02 = -fx txc / tz^2 (likewise for y), txc = tz * clamp(tx / tz).
        const T tz2 = tz * tz, tz3 = tz2 * tz;
        const T txc = tz * p.uc, tyc = tz * p.vc;
        T v_tx = 0, v_ty = 0, v_tz = 0;
        v_tz += v_J[0][0] * (-cam.fx / tz2) + v_J[1][1] * (-cam.fy / tz2);
        v_tz += v_J[0][2] * (T(2) * cam.fx * txc / tz3) + v_J[1][2] * (T(2) * cam.fy * tyc / tz3);
        const T v_txc = v_J[0][2] * (-cam.fx / tz2), v_tyc = v_J[1][2] * (-cam.fy / tz2);
        v_tz += v_txc * p.uc + v_tyc * p.vc;
        if (p.pass_x) {
          const T gu = v_txc * tz;
          v_tx += gu / tz;
          v_tz -= gu * p.u / tz;
        }
        if (p.pass_y) {
          const T gv = v_tyc * tz;
          v_ty += gv / tz;
          v_tz -= gv * p.v / tz;
        }

        // means2d = (fx tx / tz + cx, fy ty / tz + cy); depth = tz.
        const T gm0 = p_vm2d[i * 2 + 0], gm1 = p_vm2d[i * 2 + 1];
        v_tx += gm0 * cam.fx / tz;
        v_ty += gm1 * cam.fy / tz;
        v_tz += -(gm0 * cam.fx * tx + gm1 * cam.fy * ty) / tz2;
        v_tz += p_vdep[i];

        // means_c = R mean + t; covc = R cov R^T.
        const T v_mc[3] = {v_tx, v_ty, v_tz};
        for (int k = 0; k < 3; ++k)
          v_mean[k] += cam.R[0][k] * v_mc[0] + cam.R[1][k] * v_mc[1] + cam.R[2][k] * v_mc[2];
        T tmp[3][3], v_cov_c[3][3];
        matmul3_at(cam.R, v_covc, tmp);
        matmul3(tmp, cam.R, v_cov_c);
        for (int k = 0; k < 3; ++k)
          for (int l = 0; l < 3; ++l) v_cov[k][l] += v_cov_c[k][l];
      }
      if (!any) continue;

      // cov = M M^T -> v_M = (v_cov + v_cov^T) M; M = R diag(s).
      T v_M[3][3];
      for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) {
          T acc = 0;
          for (int l = 0; l < 3; ++l) acc += (v_cov[r][l] + v_cov[l][r]) * g.M[l][k];
          v_M[r][k] = acc;
        }
      T v_R[3][3];
      for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) v_R[r][k] = v_M[r][k] * g.s[k];
      for (int k = 0; k < 3; ++k) o_scales[n * 3 + k] = v_M[0][k] * g.Rq[0][k] + v_M[1][k] * g.Rq[1][k] + v_M[2][k] * g.Rq[2][k];

      // Rotation matrix from the normalised quaternion (w, x, y, z).
      const T w = g.qn[0], x = g.qn[1], y = g.qn[2], z = g.qn[3];
      T v_qn[4];
      v_qn[0] = T(2) * (-z * v_R[0][1] + y * v_R[0][2] + z * v_R[1][0] - x * v_R[1][2] - y * v_R[2][0] + x * v_R[2][1]);
      v_qn[1] = T(2) * (y * v_R[0][1] + z * v_R[0][2] + y * v_R[1][0] - T(2) * x * v_R[1][1] - w * v_R[1][2] +
                        z * v_R[2][0] + w * v_R[2][1] - T(2) * x * v_R[2][2]);
      v_qn[2] = T(2) * (-T(2) * y * v_R[0][0] + x * v_R[0][1] + w * v_R[0][2] + x * v_R[1][0] + z * v_R[1][2] -
                        w * v_R[2][0] + z * v_R[2][1] - T(2) * y * v_R[2][2]);
      v_qn[3] = T(2) * (-T(2) * z * v_R[0][0] - w * v_R[0][1] + x * v_R[0][2] + w * v_R[1][0] - T(2) * z * v_R[1][1] +
                        y * v_R[1][2] + x * v_R[2][0] + y * v_R[2][1]);
      normalize_vjp<T, 4>(g.q, v_qn, o_quats + n * 4);
      for (int k = 0; k < 3; ++k) o_means[n * 3 + k] = v_mean[k];
    }
  };
  AT_DISPATCH_FLOATING_TYPES(dt, "project_bwd", [&] { kernel(scalar_t(0)); });
  return {v_means, v_quats, v_scales};
}

// ---------------------------------------------------------------------------------------------
// Spherical harmonics (gsplat's real SH ordering, degree <= 3).
// ---------------------------------------------------------------------------------------------

constexpr double SH_C0 = 0.28209479177387814;
constexpr double SH_C1 = 0.48860251190292;

// Bases at the unit direction (x, y, z); with grad != nullptr also their partial derivatives
// grad[b][0..2] = d basis_b / d(x, y, z).
template <typename T>
inline void sh_bases(int degree, T x, T y, T z, T* basis, T (*grad)[3]) {
  basis[0] = T(SH_C0);
  if (grad) grad[0][0] = grad[0][1] = grad[0][2] = T(0);
  if (degree < 1) return;
  const T c1 = T(SH_C1);
  basis[1] = -c1 * y;
  basis[2] = c1 * z;
  basis[3] = -c1 * x;
  if (grad) {
    const T g[3][3] = {{0, -c1, 0}, {0, 0, c1}, {-c1, 0, 0}};
    for (int b = 0; b < 3; ++b)
      for (int k = 0; k < 3; ++k) grad[1 + b][k] = g[b][k];
  }
  if (degree < 2) return;
  const T z2 = z * z, fc1 = x * x - y * y, fs1 = T(2) * x * y;
  const T k4 = T(0.5462742152960395), k5 = T(-1.092548430592079), k6a = T(0.9461746957575601),
          k6b = T(0.3153915652525201);
  basis[4] = k4 * fs1;
  basis[5] = k5 * z * y;
  basis[6] = k6a * z2 - k6b;
  basis[7] = k5 * z * x;
  basis[8] = k4 * fc1;
  if (grad) {
    const T g[5][3] = {{k4 * T(2) * y, k4 * T(2) * x, 0},
                       {0, k5 * z, k5 * y},
                       {0, 0, k6a * T(2) * z},
                       {k5 * z, 0, k5 * x},
                       {k4 * T(2) * x, -k4 * T(2) * y, 0}};
    for (int b = 0; b < 5; ++b)
      for (int k = 0; k < 3; ++k) grad[4 + b][k] = g[b][k];
  }
  if (degree < 3) return;
  const T fc2 = x * fc1 - y * fs1, fs2 = x * fs1 + y * fc1;
  const T kc_a = T(-2.285228997322329), kc_b = T(0.4570457994644658);
  const T tmp_c = kc_a * z2 + kc_b;
  const T kb = T(1.445305721320277);
  const T tmp_b = kb * z;
  const T k9 = T(-0.5900435899266435), k12a = T(1.865881662950577), k12b = T(1.119528997770346);
  basis[9] = k9 * fs2;
  basis[10] = tmp_b * fs1;
  basis[11] = tmp_c * y;
  basis[12] = z * (k12a * z2 - k12b);
  basis[13] = tmp_c * x;
  basis[14] = tmp_b * fc1;
  basis[15] = k9 * fc2;
  if (grad) {
    // fs2 = 3 x^2 y - y^3, fc2 = x^3 - 3 x y^2 (as polynomials)
    const T dfs2_dx = T(6) * x * y, dfs2_dy = T(3) * (x * x - y * y);
    const T dfc2_dx = T(3) * (x * x - y * y), dfc2_dy = -T(6) * x * y;
    const T dtmp_c_dz = T(2) * kc_a * z;
    const T g[7][3] = {{k9 * dfs2_dx, k9 * dfs2_dy, 0},
                       {tmp_b * T(2) * y, tmp_b * T(2) * x, kb * fs1},
                       {0, tmp_c, dtmp_c_dz * y},
                       {0, 0, T(3) * k12a * z2 - k12b},
                       {tmp_c, 0, dtmp_c_dz * x},
                       {tmp_b * T(2) * x, -tmp_b * T(2) * y, kb * fc1},
                       {k9 * dfc2_dx, k9 * dfc2_dy, 0}};
    for (int b = 0; b < 7; ++b)
      for (int k = 0; k < 3; ++k) grad[9 + b][k] = g[b][k];
  }
}

template <typename T>
inline void unit_dir(const T* d, T* u) {
  const T norm = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  const T denom = std::max(norm, T(kNormalizeEps));
  for (int k = 0; k < 3; ++k) u[k] = d[k] / denom;
}

void check_sh_inputs(int64_t degree, const at::Tensor& dirs, const at::Tensor& coeffs,
                     const std::optional<at::Tensor>& masks) {
  TORCH_CHECK(degree >= 0 && degree <= 3, "spherical_harmonics: degree must be in [0, 3], got ", degree);
  check_cpu(dirs, "dirs");
  check_cpu(coeffs, "coeffs");
  TORCH_CHECK(dirs.dim() == 3 && dirs.size(2) == 3, "spherical_harmonics: `dirs` must have shape [C, N, 3], got ",
              dirs.sizes());
  const int64_t C = dirs.size(0), N = dirs.size(1), B = (degree + 1) * (degree + 1);
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.size(0) == N && coeffs.size(1) >= B && coeffs.size(2) == 3,
              "spherical_harmonics: `coeffs` must have shape [N, K, 3] with N = ", N, " and K >= ", B,
              " for degree ", degree, ", got ", coeffs.sizes());
  TORCH_CHECK(at::isFloatingType(dirs.scalar_type()) && coeffs.scalar_type() == dirs.scalar_type(),
              "spherical_harmonics: `dirs` and `coeffs` must share one floating dtype, got ", dirs.scalar_type(),
              " and ", coeffs.scalar_type());
  if (masks.has_value() && masks->defined()) check_shape(*masks, "masks", {C, N});
}

at::Tensor sh_fwd(int64_t degree, const at::Tensor& dirs_in, const at::Tensor& coeffs_in,
                  const std::optional<at::Tensor>& masks_in) {
  check_sh_inputs(degree, dirs_in, coeffs_in, masks_in);
  const at::Tensor dirs = dirs_in.contiguous(), coeffs = coeffs_in.contiguous();
  const bool has_mask = masks_in.has_value() && masks_in->defined();
  const at::Tensor masks = has_mask ? masks_in->to(at::kBool).contiguous() : at::Tensor();
  const int64_t C = dirs.size(0), N = dirs.size(1), K = coeffs.size(1);
  const int B = int((degree + 1) * (degree + 1));
  at::Tensor colors = at::zeros({C, N, 3}, dirs.options());

  // The OpenMP pragma cannot sit inside a macro argument, hence the generic lambda.
  auto kernel = [&](auto zero) {
    using T = decltype(zero);
    const T* p_dirs = dirs.data_ptr<T>();
    const T* p_coeffs = coeffs.data_ptr<T>();
    const bool* p_masks = has_mask ? masks.data_ptr<bool>() : nullptr;
    T* p_colors = colors.data_ptr<T>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < C * N; ++i) {
      if (p_masks && !p_masks[i]) continue;
      const int64_t n = i % N;
      T u[3], basis[16];
      unit_dir(p_dirs + i * 3, u);
      sh_bases<T>(int(degree), u[0], u[1], u[2], basis, nullptr);
      const T* cf = p_coeffs + n * K * 3;
      for (int k = 0; k < 3; ++k) {
        T acc = 0;
        for (int b = 0; b < B; ++b) acc += basis[b] * cf[b * 3 + k];
        p_colors[i * 3 + k] = acc;
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(dirs.scalar_type(), "sh_fwd", [&] { kernel(scalar_t(0)); });
  return colors;
}

// Gradients of dirs [C, N, 3] (through the normalisation) and coeffs [N, K, 3] (summed over cameras).
std::tuple<at::Tensor, at::Tensor> sh_bwd(int64_t degree, const at::Tensor& dirs_in, const at::Tensor& coeffs_in,
                                          const std::optional<at::Tensor>& masks_in, const at::Tensor& v_colors_in) {
  check_sh_inputs(degree, dirs_in, coeffs_in, masks_in);
  const at::Tensor dirs = dirs_in.contiguous(), coeffs = coeffs_in.contiguous();
  const int64_t C = dirs.size(0), N = dirs.size(1), K = coeffs.size(1);
  check_shape(v_colors_in, "v_colors", {C, N, 3});
  const at::Tensor v_colors = v_colors_in.to(dirs.scalar_type()).contiguous();
  const bool has_mask = masks_in.has_value() && masks_in->defined();
  const at::Tensor masks = has_mask ? masks_in->to(at::kBool).contiguous() : at::Tensor();
  const int B = int((degree + 1) * (degree + 1));
  at::Tensor v_dirs = at::zeros({C, N, 3}, dirs.options());
  at::Tensor v_coeffs = at::zeros({N, K, 3}, coeffs.options());

  // The OpenMP pragma cannot sit inside a macro argument, hence the generic lambda.
  auto kernel = [&](auto zero) {
    using T = decltype(zero);
    const T* p_dirs = dirs.data_ptr<T>();
    const T* p_coeffs = coeffs.data_ptr<T>();
    const T* p_vcol = v_colors.data_ptr<T>();
    const bool* p_masks = has_mask ? masks.data_ptr<bool>() : nullptr;
    T* o_dirs = v_dirs.data_ptr<T>();
    T* o_coeffs = v_coeffs.data_ptr<T>();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* cf = p_coeffs + n * K * 3;
      T* vcf = o_coeffs + n * K * 3;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = c * N + n;
        if (p_masks && !p_masks[i]) continue;
        T u[3], basis[16], grad[16][3];
        unit_dir(p_dirs + i * 3, u);
        sh_bases<T>(int(degree), u[0], u[1], u[2], basis, grad);
        const T* g = p_vcol + i * 3;
        T v_u[3] = {0, 0, 0};
        for (int b = 0; b < B; ++b) {
          T v_basis = 0;
          for (int k = 0; k < 3; ++k) {
            vcf[b * 3 + k] += basis[b] * g[k];
            v_basis += cf[b * 3 + k] * g[k];
          }
          for (int k = 0; k < 3; ++k) v_u[k] += v_basis * grad[b][k];
        }
        normalize_vjp<T, 3>(p_dirs + i * 3, v_u, o_dirs + i * 3);
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(dirs.scalar_type(), "sh_bwd", [&] { kernel(scalar_t(0)); });
  return {v_dirs, v_coeffs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ms_splatfacto, m) {
  m.def(
      "project_fwd(Tensor means, Tensor quats, Tensor scales, Tensor viewmats, Tensor Ks, int width, int height, "
      "float eps2d, float near_plane, float far_plane, float radius_clip, bool calc_compensations) -> "
      "(Tensor radii, Tensor means2d, Tensor depths, Tensor conics, Tensor compensations)",
      &project_fwd);
  m.def(
      "project_bwd(Tensor means, Tensor quats, Tensor scales, Tensor viewmats, Tensor Ks, int width, int height, "
      "float eps2d, Tensor radii, Tensor v_means2d, Tensor v_depths, Tensor v_conics, Tensor? v_compensations) -> "
      "(Tensor v_means, Tensor v_quats, Tensor v_scales)",
      &project_bwd);
  m.def("sh_fwd(int degree, Tensor dirs, Tensor coeffs, Tensor? masks) -> Tensor colors", &sh_fwd);
  m.def(
      "sh_bwd(int degree, Tensor dirs, Tensor coeffs, Tensor? masks, Tensor v_colors) -> "
      "(Tensor v_dirs, Tensor v_coeffs)",
      &sh_bwd);
}
