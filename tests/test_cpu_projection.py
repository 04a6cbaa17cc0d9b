"""The C++ projection / SH kernels against the pure-PyTorch reference (the specification).

Forward outputs must match the reference to float rounding (radii exactly); gradients of a random
linear functional of the outputs must match the reference's autograd (float64: ~1e-9 relative).
Scenes deliberately contain every culling case and the clamped-Jacobian branch.
"""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend import build
from ms_splatfacto.backend.kernels import _cpu_projection as cpu
from ms_splatfacto.backend.kernels import reference as ref

W, H = 80, 60
C = 3


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Build (or load the cached) CPU kernels once; the production build path."""
    build.load_cpu_kernels()
    return torch.ops.ms_splatfacto


def look_at(
    eye: torch.Tensor,  # [3]
    target: torch.Tensor,  # [3]
) -> torch.Tensor:
    """World-to-camera [4, 4] (OpenCV convention: +z forward, +y down) for a camera at eye."""
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    R = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    viewmat = torch.eye(4, dtype=eye.dtype)
    viewmat[:3, :3] = R
    viewmat[:3, 3] = -R @ eye
    return viewmat


def make_scene(dtype: torch.dtype, seed: int = 0, n_random: int = 150):
    """Random Gaussians around the origin plus hand-placed special cases, seen by C cameras.

    All Gaussians are anisotropic: an isotropic one has an identically zero quaternion gradient,
    which both implementations only produce as rounding noise.
    """
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    means = torch.randn(n_random, 3, generator=g, dtype=d) * 1.5
    log_scales = torch.randn(n_random, 3, generator=g, dtype=d) * 0.7 - 2.5
    eyes = torch.tensor([[6.0, 0.5, 1.0], [-1.0, 6.5, 0.5], [0.5, -0.5, 7.0]], dtype=d)
    eyes = eyes + 0.2 * torch.randn(C, 3, generator=g, dtype=d)
    viewmats = torch.stack([look_at(e, torch.zeros(3, dtype=d)) for e in eyes])
    c2w = torch.linalg.inv(viewmats)
    fwd0, right0 = c2w[0, :3, 2], c2w[0, :3, 0]
    special_means = torch.stack([
        eyes[0] - 2.0 * fwd0,                 # behind camera 0
        eyes[0] + 0.005 * fwd0,               # in front of camera 0 but closer than the near plane
        eyes[0] + 40.0 * fwd0,                # beyond the far plane (far_plane=30 in the tests)
        eyes[0] + 6.0 * fwd0 + 30.0 * right0,  # far off-screen (small)
        eyes[0] + 6.0 * fwd0 + 3.2 * right0,   # centre just off-screen, footprint reaches in
        eyes[0] + 3.0 * fwd0 + 6.0 * right0,   # huge, centre far outside the clamp limits
        torch.zeros(3, dtype=d),               # huge, in view
        torch.tensor([0.3, -0.2, 0.1], dtype=d),  # tiny
        torch.tensor([-0.4, 0.1, 0.2], dtype=d),  # tiny
        torch.tensor([0.2, 0.3, -0.3], dtype=d),  # degenerate (zero scales): det_orig = 0 exactly
    ])
    special_log_scales = torch.log(torch.tensor([
        [0.1, 0.15, 0.08], [0.1, 0.12, 0.07], [0.1, 0.2, 0.1], [0.05, 0.04, 0.06], [0.5, 0.3, 0.4],
        [50.0, 40.0, 45.0], [50.0, 30.0, 55.0], [1e-4, 2e-4, 1e-4], [1e-4, 1e-4, 3e-4], [0.0, 0.0, 0.0],
    ], dtype=d))
    means = torch.cat([means, special_means])
    scales = torch.exp(torch.cat([log_scales, special_log_scales]))
    quats = torch.randn(means.shape[0], 4, generator=g, dtype=d) * 2.0  # unnormalised on purpose
    Ks = torch.tensor([[60.0, 0.0, 40.0], [0.0, 62.0, 29.0], [0.0, 0.0, 1.0]], dtype=d).repeat(C, 1, 1)
    Ks[1, 0, 0], Ks[2, 0, 2] = 45.0, 35.0
    return [t.to(dtype) for t in (means, quats, scales, viewmats, Ks)]


PROJECT_SETTINGS = [
    dict(calc_compensations=False),
    dict(calc_compensations=True, far_plane=30.0),
    dict(calc_compensations=True, eps2d=0.1, radius_clip=3.0, near_plane=0.2),
]


def run_project(impl, scene, settings, weights_seed=1):
    """Outputs of `impl.project` on scene = (means, quats, scales, viewmats, Ks) and the gradients
    (means, quats, scales) of a random linear functional of the valid outputs."""
    means, quats, scales, viewmats, Ks = [t.clone().requires_grad_(i < 3) for i, t in enumerate(scene)]
    radii, means2d, depths, conics, comps = impl.project(means, quats, scales, viewmats, Ks, W, H, **settings)
    g = torch.Generator().manual_seed(weights_seed)
    valid = (radii > 0).to(means2d.dtype)

    def weights(shape):
        w = torch.randn(shape, generator=g, dtype=torch.float64).to(means2d.dtype)
        return w * (valid[..., None] if len(shape) == 3 else valid)

    loss = (means2d * weights(means2d.shape)).sum() + (depths * weights(depths.shape)).sum()
    loss = loss + (conics * weights(conics.shape)).sum() * 10.0
    if comps is not None:
        loss = loss + (comps * weights(comps.shape)).sum() * 10.0
    grads = torch.autograd.grad(loss, [means, quats, scales])
    outs = [t.detach() if t is not None else None for t in (radii, means2d, depths, conics, comps)]
    return outs, grads


def assert_close_scaled(actual, expected, rtol, name):
    """Elementwise rtol plus an absolute slack of rtol times the tensor's largest magnitude."""
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_scene_covers_the_culling_cases():
    """Guards the other tests' honesty: each culling rule, the Jacobian clamp and the boundary
    cases of radius_clip and compensation are exercised by the scenes."""
    means, quats, scales, viewmats, Ks = make_scene(torch.float64)
    N = means.shape[0]
    radii, _, _, _, comps = ref.project(means, quats, scales, viewmats, Ks, W, H, far_plane=30.0,
                                        calc_compensations=True)
    special = radii[0, N - 10:]
    assert special[0] == 0 and special[1] == 0 and special[2] == 0  # behind / before near / beyond far
    assert special[3] == 0  # off-screen
    assert special[4] > 0 and special[5] > 0  # partially visible; huge with its centre outside the frustum
    assert special[9] > 0 and comps[0, N - 1] == 0  # degenerate: visible thanks to the blur, no compensation
    assert (radii > 0).float().mean() > 0.5
    means_c = torch.einsum("cij,nj->cni", viewmats[:, :3, :3], means) + viewmats[:, None, :3, 3]
    u = means_c[..., 0] / means_c[..., 2]
    lim = (W - Ks[:, 0, 2, None]) / Ks[:, 0, 0, None] + 0.3 * 0.5 * W / Ks[:, 0, 0, None]
    assert ((u > lim) & (radii > 0)).any(), "no visible Gaussian hits the Jacobian clamp"
    clip = PROJECT_SETTINGS[2]
    radii_noclip = ref.project(means, quats, scales, viewmats, Ks, W, H, **{**clip, "radius_clip": 0.0})[0]
    assert (radii_noclip == clip["radius_clip"]).any(), "no radius sits exactly on radius_clip"


@pytest.mark.parametrize("settings", PROJECT_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_matches_reference(settings, dtype):
    scene = make_scene(dtype, seed=3)
    (radii, means2d, depths, conics, comps), grads = run_project(cpu, scene, settings)
    (r_radii, r_means2d, r_depths, r_conics, r_comps), r_grads = run_project(ref, scene, settings)

    assert radii.dtype == torch.int32 and radii.shape == r_radii.shape
    assert torch.equal(radii, r_radii)
    assert (radii > 0).any() and (radii == 0).any()
    fwd_rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close_scaled(means2d, r_means2d, fwd_rtol, "means2d")
    assert_close_scaled(depths, r_depths, fwd_rtol, "depths")
    for k in range(3):  # per component: conics[..., 1] is much smaller than the diagonal
        assert_close_scaled(conics[..., k], r_conics[..., k], fwd_rtol, f"conics[{k}]")
    culled = radii == 0
    assert means2d[culled].abs().max() == 0 and conics[culled].abs().max() == 0 and depths[culled].abs().max() == 0
    if settings.get("calc_compensations"):
        assert comps is not None and comps.shape == r_comps.shape
        assert_close_scaled(comps, r_comps, fwd_rtol, "compensations")
        assert comps[culled].abs().max() == 0
    else:
        assert comps is None and r_comps is None

    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for name, gc, gr in zip(["means", "quats", "scales"], grads, r_grads):
        assert gr.abs().max() > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        assert_close_scaled(gc, gr, grad_rtol, f"d/d{name}")
        if dtype == torch.float64:
            # Per Gaussian too, so that small Gaussians' rows are checked, not only the largest ones.
            # (In float32 the reference itself loses digits to cancellation on such rows.)
            scale = gr.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(gr.dtype).tiny)
            assert ((gc - gr).abs() / scale).max() < 1e-8, f"d/d{name}: row-relative error too large"


def test_compensation_gradient_is_exact():
    """Only compensations in the functional: catches gsplat's approximate compensation VJP."""
    means, quats, scales, viewmats, Ks = make_scene(torch.float64, seed=5)
    grads = {}
    for impl in (cpu, ref):
        q = quats.clone().requires_grad_(True)
        s = scales.clone().requires_grad_(True)
        m = means.clone().requires_grad_(True)
        comps = impl.project(m, q, s, viewmats, Ks, W, H, calc_compensations=True)[4]
        w = torch.linspace(0.5, 1.5, comps.numel(), dtype=torch.float64).reshape(comps.shape)
        grads[impl] = torch.autograd.grad((comps * w).sum(), [m, q, s])
    for gc, gr in zip(grads[cpu], grads[ref]):
        assert gr.abs().max() > 0
        assert_close_scaled(gc, gr, 1e-9, "compensation gradient")


def test_unused_outputs_and_partial_grads():
    """Backward with only some outputs used (the others get materialised zero gradients)."""
    means, quats, scales, viewmats, Ks = make_scene(torch.float64, seed=7)
    results = []
    for impl in (cpu, ref):
        m = means.clone().requires_grad_(True)
        depths = impl.project(m, quats, scales, viewmats, Ks, W, H)[2]
        (g,) = torch.autograd.grad(depths.sum(), [m])
        results.append(g)
    assert results[1].abs().max() > 0
    assert_close_scaled(results[0], results[1], 1e-12, "d depths / d means")


def test_project_non_contiguous_inputs_and_determinism():
    means, quats, scales, viewmats, Ks = make_scene(torch.float64, seed=11)
    settings = dict(calc_compensations=True)
    out_a, grads_a = run_project(cpu, (means, quats, scales, viewmats, Ks), settings)
    nc = [t.t().contiguous().t() if t.dim() == 2 else t.transpose(1, 2).contiguous().transpose(1, 2)
          for t in (means, quats, scales, viewmats, Ks)]
    assert not nc[0].is_contiguous()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out_b, grads_b = run_project(cpu, nc, settings)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(out_a + list(grads_a), out_b + list(grads_b)):
        assert torch.equal(a, b)  # bitwise: no atomics, no thread-count dependence


def test_project_camera_gradients_raise():
    means, quats, scales, viewmats, Ks = make_scene(torch.float32)
    with pytest.raises(NotImplementedError, match="Camera-pose gradients"):
        cpu.project(means, quats, scales, viewmats.clone().requires_grad_(True), Ks, W, H)
    with pytest.raises(NotImplementedError, match="reference"):
        cpu.project(means, quats, scales, viewmats, Ks.clone().requires_grad_(True), W, H)
    with torch.no_grad():  # nothing will be differentiated, so this is allowed
        cpu.project(means, quats, scales, viewmats.clone().requires_grad_(True), Ks, W, H)


def test_project_shape_and_dtype_errors(kernels):
    means, quats, scales, viewmats, Ks = make_scene(torch.float32)
    with pytest.raises(AssertionError, match="quats"):
        cpu.project(means, quats[:, :3], scales, viewmats, Ks, W, H)
    with pytest.raises(AssertionError, match="Ks"):
        cpu.project(means, quats, scales, viewmats, Ks[:2], W, H)
    args = (W, H, 0.3, 0.01, 1e10, 0.0, False)
    with pytest.raises(RuntimeError, match=r"`scales` must have shape \[\d+, 3\]"):
        kernels.project_fwd(means, quats, scales[:-1], viewmats, Ks, *args)
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernels.project_fwd(means, quats, scales, viewmats.double(), Ks, *args)


# ----------------------------------------------------------------------------------------------
# Spherical harmonics
# ----------------------------------------------------------------------------------------------


def make_sh_inputs(degree, K, dtype, masked, seed=0, N=64):
    """dirs [C, N, 3] of various lengths, coeffs [N, K, 3], masks [C, N] or None."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(C, N, 3, generator=g, dtype=torch.float64)
    dirs = dirs * torch.exp(torch.randn(C, N, 1, generator=g, dtype=torch.float64))  # various lengths
    coeffs = torch.randn(N, K, 3, generator=g, dtype=torch.float64)
    masks = None
    if masked:
        masks = torch.rand(C, N, generator=g) > 0.3
        dirs[~masks] = 0.0  # masked entries may hold garbage such as zero directions
    return dirs.to(dtype), coeffs.to(dtype), masks


def run_sh(
    impl,
    degree: int,
    dirs: torch.Tensor,  # [C, N, 3]
    coeffs: torch.Tensor,  # [N, K, 3]
    masks,  # [C, N] bool or None
    w=None,  # [C, N, 3] or None
):
    """Colours and the gradients of sum(colours * w) (w random [C, N, 3] unless given)."""
    d = dirs.clone().requires_grad_(True)
    c = coeffs.clone().requires_grad_(True)
    colors = impl.spherical_harmonics(degree, d, c, masks)
    if w is None:
        w = torch.randn(colors.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((colors * w.to(colors.dtype)).sum(), [d, c], allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, (d, c))]
    return colors.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("degree,K", [(0, 1), (1, 4), (2, 9), (3, 16), (0, 16), (1, 16), (2, 16)])
def test_spherical_harmonics_matches_reference(degree, K, masked, dtype):
    dirs, coeffs, masks = make_sh_inputs(degree, K, dtype, masked, seed=degree * 10 + K)
    colors, (g_dirs, g_coeffs) = run_sh(cpu, degree, dirs, coeffs, masks)
    r_colors, (r_dirs, r_coeffs) = run_sh(ref, degree, dirs, coeffs, masks)

    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert colors.shape == (C, dirs.shape[1], 3)
    assert_close_scaled(colors, r_colors, rtol, "colors")
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert r_coeffs.abs().max() > 0
    assert_close_scaled(g_coeffs, r_coeffs, grad_rtol, "d/dcoeffs")
    B = (degree + 1) ** 2
    assert g_coeffs[:, B:].abs().sum() == 0  # coefficients beyond the degree are unused
    if degree == 0:
        assert g_dirs.abs().max() == 0
    else:
        assert r_dirs.abs().max() > 0
        assert_close_scaled(g_dirs, r_dirs, grad_rtol, "d/ddirs")
    if masked:
        assert colors[~masks].abs().max() == 0 and g_dirs[~masks].abs().max() == 0
        assert torch.isfinite(g_dirs).all()


def test_spherical_harmonics_determinism_and_sum_over_cameras():
    """Coefficient gradients are summed over cameras, independently of the thread count."""
    dirs, coeffs, _ = make_sh_inputs(3, 16, torch.float64, masked=False, seed=4)
    w = torch.randn(dirs.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    colors, (g_dirs, g_coeffs) = run_sh(cpu, 3, dirs, coeffs, None, w)
    per_camera = sum(run_sh(cpu, 3, dirs[c : c + 1], coeffs, None, w[c : c + 1])[1][1] for c in range(C))
    assert_close_scaled(g_coeffs, per_camera, 1e-12, "sum over cameras")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        colors_1, (g_dirs_1, g_coeffs_1) = run_sh(cpu, 3, dirs, coeffs, None, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(colors, colors_1) and torch.equal(g_dirs, g_dirs_1) and torch.equal(g_coeffs, g_coeffs_1)


def test_spherical_harmonics_errors(kernels):
    dirs, coeffs, masks = make_sh_inputs(2, 9, torch.float32, masked=True)
    with pytest.raises(AssertionError, match="K >= 16"):
        cpu.spherical_harmonics(3, dirs, coeffs, masks)
    with pytest.raises(AssertionError, match="masks"):
        cpu.spherical_harmonics(2, dirs, coeffs, masks[:, :-1])
    with pytest.raises(RuntimeError, match="degree must be in"):
        kernels.sh_fwd(4, dirs, coeffs, None)
    with pytest.raises(RuntimeError, match=r"`coeffs` must have shape \[N, K, 3\]"):
        kernels.sh_fwd(2, dirs, coeffs[:-1], None)
