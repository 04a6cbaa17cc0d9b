"""The CPU kernel set's direct forward/backward (what the tile rasterizer calls per member instead of an
autograd graph) gives the images and unrounded gradient sums of the autograd path, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend.kernels import _cpu_rasterize as cpu
from tests.test_cpu_rasterize import HEIGHT, TILE, WIDTH, intersections, make_scene


@pytest.mark.parametrize("kind", ["mixed", "stack", "needles"])
@pytest.mark.parametrize("dtype, absgrad, background", [(torch.float32, True, True), (torch.float64, False, False)])
def test_direct_pass_equals_the_autograd_pass(kind: str, dtype: torch.dtype, absgrad: bool, background: bool):
    scene = make_scene(3, dtype=dtype, kind=kind)
    offsets, flatten_ids = intersections(scene)
    records = (scene.means2d, scene.conics, scene.colors, scene.opacities)
    bg = scene.backgrounds if background else None
    g = torch.Generator().manual_seed(4)
    v_colors = torch.randn(3, HEIGHT, WIDTH, 3, generator=g, dtype=torch.float64).to(dtype)
    v_alphas = torch.randn(3, HEIGHT, WIDTH, 1, generator=g, dtype=torch.float64).to(dtype)

    leaves = [t.clone().requires_grad_() for t in records]
    sums: dict = {}
    colors, alphas = cpu.rasterize_to_pixels(*leaves, WIDTH, HEIGHT, TILE, offsets, flatten_ids, backgrounds=bg,
                                             absgrad=absgrad, float64_sums=sums)
    torch.autograd.backward([colors, alphas], [v_colors, v_alphas])

    d_colors, d_alphas, saved = cpu.rasterize_to_pixels_direct(*records, WIDTH, HEIGHT, TILE, offsets, flatten_ids, backgrounds=bg)
    direct = cpu.rasterize_to_pixels_direct_backward(saved, v_colors, v_alphas, absgrad=absgrad)

    assert torch.equal(d_colors, colors.detach()) and torch.equal(d_alphas, alphas.detach())
    assert not d_colors.requires_grad
    for name in ("means2d", "conics", "colors", "opacities"):
        assert direct[name].dtype == torch.float64 and torch.equal(direct[name], sums[name]), name
        assert direct[name].abs().sum() > 0, name
    assert (direct["absgrad"] is None) == (not absgrad)
    if absgrad:
        assert torch.equal(direct["absgrad"], sums["absgrad"])
