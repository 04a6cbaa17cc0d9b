"""The backend's rendering pipeline: CPU kernels vs the pure-PyTorch reference, end to end, and
the backend's independence from nerfstudio."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gsplat.cuda import _torch_impl as gsplat_torch

from ms_splatfacto.backend import DeviceSpecError, parse_devices, rasterization
from ms_splatfacto.backend.kernels import reference


def random_scene(n: int = 400, cameras: int = 3, seed: int = 0, dtype=torch.float32):
    """Gaussians around the cameras' view, including ones behind the cameras, far off-screen, huge and tiny."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * torch.tensor([2.0, 1.5, 1.0], dtype=dtype)
    means[:, 2] += 5
    means[: n // 20, 2] = -3  # behind
    means[n // 20 : n // 10, 0] = 80  # off-screen
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.2 + 0.01
    scales[n // 10 : n // 10 + 3] = 20.0  # huge
    scales[n // 10 + 3 : n // 10 + 10] = 1e-4  # tiny
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    sh = torch.randn(n, 16, 3, generator=g, dtype=dtype) * 0.3
    viewmats = torch.eye(4, dtype=dtype).repeat(cameras, 1, 1)
    for c in range(cameras):
        angle = torch.tensor(0.15 * c, dtype=dtype)
        viewmats[c, 0, 0], viewmats[c, 0, 2] = torch.cos(angle), torch.sin(angle)
        viewmats[c, 2, 0], viewmats[c, 2, 2] = -torch.sin(angle), torch.cos(angle)
        viewmats[c, :3, 3] = torch.tensor([0.2 * c, -0.1 * c, 0.3 * c], dtype=dtype)
    Ks = torch.tensor([[70.0, 0, 38], [0, 70.0, 26], [0, 0, 1]], dtype=dtype).repeat(cameras, 1, 1)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=sh, viewmats=viewmats, Ks=Ks)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_cpu_pipeline_matches_reference(mode: str):
    scene = random_scene()
    inputs = {k: v.clone().requires_grad_(k not in ("viewmats", "Ks")) for k, v in scene.items()}
    ref_inputs = {k: v.clone().requires_grad_(k not in ("viewmats", "Ks")) for k, v in scene.items()}
    kwargs = dict(width=75, height=52, sh_degree=3, render_mode="RGB+ED", absgrad=True, rasterize_mode=mode)
    out, alpha, info = rasterization(**inputs, kernels="cpu", **kwargs)
    ref_out, ref_alpha, ref_info = rasterization(**ref_inputs, kernels="reference", **kwargs)

    assert torch.equal(info["radii"], ref_info["radii"])
    assert info["radii"].eq(0).any() and info["radii"].gt(0).any()
    torch.testing.assert_close(alpha, ref_alpha, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[..., :3], ref_out[..., :3], atol=2e-5, rtol=1e-4)
    covered = ref_alpha[..., 0] > 0.1  # expected depth is only meaningful where something was drawn
    torch.testing.assert_close(out[..., 3][covered], ref_out[..., 3][covered], atol=1e-3, rtol=1e-4)

    for meta in (info, ref_info):
        meta["means2d"].retain_grad()  # as gsplat's DefaultStrategy.step_pre_backward does
    weights = torch.randn_like(out)
    ((out * weights).sum() + alpha.sum()).backward()
    ((ref_out * weights).sum() + ref_alpha.sum()).backward()
    for name in ("means", "quats", "scales", "opacities", "colors"):
        torch.testing.assert_close(inputs[name].grad, ref_inputs[name].grad, atol=2e-4, rtol=2e-3, msg=name)
    # What gsplat's DefaultStrategy reads: means2d gradients and absgrad, [C, N, 2].
    assert info["means2d"].grad is not None and info["means2d"].grad.abs().sum() > 0
    torch.testing.assert_close(info["means2d"].grad, ref_info["means2d"].grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(info["means2d"].absgrad, ref_info["means2d"].absgrad, atol=1e-4, rtol=1e-3)
    assert info["means2d"].grad.shape == (3, 400, 2)


def test_reference_projection_and_sh_match_gsplat_torch_implementation():
    scene = random_scene(n=300, cameras=2)
    covars, _ = gsplat_torch._quat_scale_to_covar_preci(scene["quats"], scene["scales"], compute_preci=False, triu=False)
    expected = gsplat_torch._fully_fused_projection(
        scene["means"], covars, scene["viewmats"], scene["Ks"], 75, 52, calc_compensations=True
    )
    got = reference.project(scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], 75, 52,
                            calc_compensations=True)
    assert torch.equal(got[0], expected[0])
    visible = got[0] > 0
    for ours, theirs in zip(got[1:], expected[1:]):
        torch.testing.assert_close(ours[visible], theirs[visible], atol=1e-4, rtol=1e-5)
    dirs = torch.randn(2, 300, 3)
    torch.testing.assert_close(
        reference.spherical_harmonics(3, dirs, scene["colors"]),
        gsplat_torch._spherical_harmonics(3, dirs, scene["colors"].expand(2, -1, -1, -1)),
    )
    tiles = reference.isect_tiles(got[1], got[0], got[2], 16, 5, 4)
    for ours, theirs in zip(tiles, gsplat_torch._isect_tiles(got[1], got[0], got[2], 16, 5, 4)):
        assert torch.equal(ours, theirs)
    assert torch.equal(reference.isect_offset_encode(tiles[1], 2, 5, 4), gsplat_torch._isect_offset_encode(tiles[1], 2, 5, 4))


def test_device_specs():
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices(" CPU ") == [torch.device("cpu")]
    expected_auto = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert parse_devices("auto") == [expected_auto]
    for bad in ["gpu", "cuda:x", "cpu:0:1", ""]:
        with pytest.raises(DeviceSpecError, match="Available here: cpu"):
            parse_devices(bad)
    with pytest.raises(DeviceSpecError, match=f"has {torch.cuda.device_count()} visible GPU"):
        parse_devices(f"cuda:{torch.cuda.device_count()}")


def test_backend_imports_and_renders_without_nerfstudio():
    """The GPU machine has torch but not nerfstudio: the backend must import and render on the CPU
    with nerfstudio and gsplat both unimportable."""
    code = """
import sys
sys.modules["nerfstudio"] = None
sys.modules["gsplat"] = None
import torch
from ms_splatfacto.backend import rasterization
g = torch.Generator().manual_seed(1)
scene = dict(
    means=torch.randn(50, 3, generator=g) + torch.tensor([0.0, 0.0, 4.0]), quats=torch.randn(50, 4, generator=g),
    scales=torch.full((50, 3), 0.2), opacities=torch.full((50,), 0.8), colors=torch.rand(50, 4, 3, generator=g),
    viewmats=torch.eye(4)[None], Ks=torch.tensor([[[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]]]),
)
out, alpha, info = rasterization(**scene, width=32, height=24, sh_degree=1)
assert alpha.max() > 0.5, alpha.max()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the CPU pipeline parity test above runs everywhere")
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_cuda_pipeline_matches_gsplat_and_cpu(mode: str):
    from gsplat.rendering import rasterization as gsplat_rasterization

    scene = random_scene()
    kwargs = dict(width=75, height=52, sh_degree=3, render_mode="RGB+ED", rasterize_mode=mode)
    on_gpu = {k: v.cuda() for k, v in scene.items()}
    ours, ours_alpha, ours_info = rasterization(**on_gpu, **kwargs)
    theirs, theirs_alpha, theirs_info = gsplat_rasterization(**on_gpu, packed=False, **kwargs)
    assert torch.equal(ours_info["radii"], theirs_info["radii"])
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_alpha, theirs_alpha)
    cpu, cpu_alpha, _ = rasterization(**scene, kernels="cpu", **kwargs)
    torch.testing.assert_close(ours_alpha.cpu(), cpu_alpha, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(ours[..., :3].cpu(), cpu[..., :3], atol=1e-4, rtol=1e-3)
