"""C++ tile intersection and rasteriser (`_cpu_rasterize`) against the pure-PyTorch reference.

Scenes go through the reference pipeline (project -> isect_tiles -> isect_offset_encode) with
three cameras, an image size that is no multiple of the tile size, and deliberately awkward
Gaussians: huge, tiny, off-screen, behind the camera, exact depth ties, and a stack dense enough
that compositing stops at the transmittance floor. The reference itself is checked against
finite differences, so the gradient comparisons rest on something independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

from ms_splatfacto.backend.kernels import _cpu_rasterize as cpu
from ms_splatfacto.backend.kernels import reference as ref

WIDTH, HEIGHT, TILE = 70, 45, 16
TILE_W, TILE_H = math.ceil(WIDTH / TILE), math.ceil(HEIGHT / TILE)


def _rotation(axis_angle: Tensor) -> Tensor:
    """Rotation matrix [3, 3] from an axis-angle vector [3]."""
    x, y, z = axis_angle.tolist()
    skew = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_exp(skew)


def _cameras(gen: torch.Generator, C: int) -> tuple[Tensor, Tensor]:
    """World-to-camera matrices [C, 4, 4] about 5 units from the origin, looking roughly at it, and Ks [C, 3, 3]."""
    viewmats = torch.eye(4, dtype=torch.float64).repeat(C, 1, 1)
    for c in range(C):
        viewmats[c, :3, :3] = _rotation(0.15 * torch.randn(3, generator=gen, dtype=torch.float64))
        viewmats[c, :3, 3] = torch.tensor([0.3 * c - 0.3, 0.1 * c, 5.0], dtype=torch.float64)
    Ks = torch.tensor([[60.0, 0.0, WIDTH / 2], [0.0, 60.0, HEIGHT / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return viewmats, Ks.repeat(C, 1, 1)


@dataclass
class Scene:
    means2d: Tensor  # [C, N, 2]
    conics: Tensor  # [C, N, 3]
    colors: Tensor  # [C, N, D]
    opacities: Tensor  # [C, N]
    backgrounds: Tensor  # [C, D]
    radii: Tensor  # [C, N] int32
    depths: Tensor  # [C, N]


def make_scene(seed: int, dtype: torch.dtype = torch.float32, D: int = 3, N: int = 200, kind: str = "mixed") -> Scene:
    """Random Gaussians projected by the reference into 3 cameras.

    kind "mixed": scattered Gaussians plus one huge, tiny ones, off-screen ones, ones behind every
    camera and exact duplicates (identical depths); "stack": many opaque Gaussians piled near the
    image centre so transmittance reaches the 1e-4 floor; "needles": long, thin Gaussians (badly
    conditioned conics); "empty": every Gaussian behind the cameras.
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    means = (torch.rand(N, 3, **f64) - 0.5) * torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64)
    scales = torch.exp(torch.rand(N, 3, **f64) * 2.0 - 3.5)
    quats = torch.randn(N, 4, **f64)
    opacities = torch.rand(N, **f64) * 0.9 + 0.05
    if kind == "mixed":
        scales[0] = 4.0  # covers every tile of every camera
        scales[1:6] = 1e-4  # tiny: the radius comes from the 0.3 px blur alone
        means[6:10, 0] = torch.tensor([40.0, -40.0, 3.0, -3.0], dtype=torch.float64)  # off-screen (3: partly)
        means[10:14, 2] = -20.0  # behind every camera
        means[14:20] = means[20]  # exact duplicates: identical depths and means2d
        scales[21:24] = 0.4
        opacities[21:24] = 1.5  # alpha clamped to 0.999 over a few dozen pixels round each centre
    elif kind == "stack":
        means[:, :2] = (torch.rand(N, 2, **f64) - 0.5) * 0.6
        scales = torch.full((N, 3), 0.3, dtype=torch.float64) * torch.exp(torch.rand(N, 3, **f64) - 0.5)
        opacities = 0.7 + 0.2999 * torch.rand(N, **f64)
    elif kind == "needles":
        scales[:, 0] = 10 ** (torch.rand(N, **f64) * 1.5)  # 10 to 400 px long
        scales[:, 1:] = 1e-4  # and as thin as the 0.3 px blur
    elif kind == "empty":
        means[:, 2] = -20.0
    else:
        raise ValueError(kind)
    viewmats, Ks = _cameras(gen, 3)
    radii, means2d, depths, conics, _ = ref.project(means, quats, scales, viewmats, Ks, WIDTH, HEIGHT)
    C = viewmats.shape[0]
    colors = torch.rand(C, N, D, **f64)
    backgrounds = torch.rand(C, D, **f64)
    return Scene(
        means2d.to(dtype), conics.to(dtype), colors.to(dtype), opacities.repeat(C, 1).to(dtype),
        backgrounds.to(dtype), radii, depths.to(dtype),
    )


def intersections(scene: Scene) -> tuple[Tensor, Tensor]:
    """Reference isect_offsets [C, tile_height, tile_width] and flatten_ids [M] of a scene."""
    _, isect_ids, flatten_ids = ref.isect_tiles(scene.means2d, scene.radii, scene.depths, TILE, TILE_W, TILE_H)
    return ref.isect_offset_encode(isect_ids, scene.radii.shape[0], TILE_W, TILE_H), flatten_ids


# ----------------------------------------------------------------------------- intersections


def _assert_isects_equal(means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int = TILE) -> int:
    """CPU and reference isect_tiles/isect_offset_encode bit-exactly equal; returns the intersection count."""
    tile_w, tile_h = math.ceil(WIDTH / tile_size), math.ceil(HEIGHT / tile_size)
    expected = ref.isect_tiles(means2d, radii, depths, tile_size, tile_w, tile_h)
    got = cpu.isect_tiles(means2d, radii, depths, tile_size, tile_w, tile_h)
    for name, e, g in zip(("tiles_per_gauss", "isect_ids", "flatten_ids"), expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
        assert torch.equal(g, e), f"{name} differs at {int((g != e).sum())} places"
    C = radii.shape[0]
    expected_offsets = ref.isect_offset_encode(expected[1], C, tile_w, tile_h)
    got_offsets = cpu.isect_offset_encode(got[1], C, tile_w, tile_h)
    assert got_offsets.dtype == torch.int32 and torch.equal(got_offsets, expected_offsets)
    return expected[1].numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile_size", [16, 8])
def test_isect_matches_reference(dtype: torch.dtype, tile_size: int) -> None:
    scene = make_scene(0, dtype)
    n = _assert_isects_equal(scene.means2d, scene.radii, scene.depths, tile_size)
    assert n > 3 * scene.radii.shape[0] * 200 / 10, "the scene should produce plenty of intersections"


def test_isect_depth_ties_keep_emission_order() -> None:
    scene = make_scene(1)
    depths = torch.round(scene.depths * 2) / 2  # a handful of distinct depths: ties everywhere
    _, isect_ids, flatten_ids = ref.isect_tiles(scene.means2d, scene.radii, depths, TILE, TILE_W, TILE_H)
    assert (isect_ids[1:] == isect_ids[:-1]).sum() > 100, "the test needs many exactly tied keys"
    _assert_isects_equal(scene.means2d, scene.radii, depths)


def test_isect_tile_rectangles_at_float32_rounding() -> None:
    """Means on and a hair either side of tile boundaries, where float32 division decides the rectangle."""
    gen = torch.Generator().manual_seed(2)
    C, N = 2, 400
    edges = torch.randint(0, 6, (C, N, 2), generator=gen).float() * TILE
    nudge = torch.tensor([-1e-5, 0.0, 1e-5])[torch.randint(0, 3, (C, N, 2), generator=gen)]
    means2d = edges + nudge * edges.abs().clamp(min=1)
    radii = torch.randint(0, 40, (C, N), generator=gen, dtype=torch.int32)
    # mean / 16 + radius / 16 exactly halfway between two float32 values just above a power of two
    # k: float32 rounds the sum down to k, so the tile range ends at k (exact arithmetic: k + 1).
    for i, (k, r) in enumerate([(1, 1), (2, 1), (2, 8), (4, 1), (4, 16)]):
        tile_mean = torch.tensor(k - r / 16 + k * 2.0**-24, dtype=torch.float64)
        assert tile_mean.float().double() == tile_mean
        means2d[0, i] = float(tile_mean) * TILE
        radii[0, i] = r
    depths = torch.rand(C, N, generator=gen) * 10 - 1  # some negative: the key takes their raw bits
    _assert_isects_equal(means2d, radii, depths)


def test_isect_empty_scene() -> None:
    scene = make_scene(3, kind="empty")
    assert int(scene.radii.count_nonzero()) == 0
    assert _assert_isects_equal(scene.means2d, scene.radii, scene.depths) == 0
    offsets = cpu.isect_offset_encode(torch.zeros(0, dtype=torch.int64), 3, TILE_W, TILE_H)
    assert offsets.shape == (3, TILE_H, TILE_W) and not offsets.any()


# ----------------------------------------------------------------------------- rasteriser


def _render(impl, scene: Scene, use_bg: bool, absgrad: bool = False, requires_grad: bool = False):
    """Colours and alphas of `impl`, with leaf copies of the inputs (for gradients)."""
    leaves = [t.detach().clone().requires_grad_(requires_grad) for t in
              (scene.means2d, scene.conics, scene.colors, scene.opacities, scene.backgrounds)]
    offsets, flatten_ids = intersections(scene)
    means2d, conics, colors, opacities, backgrounds = leaves
    out = impl.rasterize_to_pixels(
        means2d, conics, colors, opacities, WIDTH, HEIGHT, TILE, offsets, flatten_ids,
        backgrounds=backgrounds if use_bg else None, absgrad=absgrad,
    )
    return out, leaves


@pytest.mark.parametrize("kind", ["mixed", "stack", "needles", "empty"])
@pytest.mark.parametrize("D", [3, 4])
@pytest.mark.parametrize("use_bg", [True, False])
def test_rasterize_forward_matches_reference(kind: str, D: int, use_bg: bool) -> None:
    scene = make_scene(4, torch.float32, D=D, kind=kind)
    (ref_colors, ref_alphas), _ = _render(ref, scene, use_bg)
    (colors, alphas), _ = _render(cpu, scene, use_bg)
    assert colors.shape == (3, HEIGHT, WIDTH, D) and alphas.shape == (3, HEIGHT, WIDTH, 1)
    torch.testing.assert_close(colors, ref_colors, atol=1e-5, rtol=0)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-5, rtol=0)
    if kind == "empty":
        assert not alphas.any()
    else:
        assert alphas.mean() > 0.2, "the scene should cover a good part of the images"
    if kind == "stack":
        assert alphas.max() > 1 - 2e-4, "some pixels should reach the transmittance floor"


def _loss_weights(scene: Scene, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    C, _, D = scene.colors.shape
    dtype = scene.colors.dtype
    return (torch.randn(C, HEIGHT, WIDTH, D, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(C, HEIGHT, WIDTH, 1, generator=gen, dtype=torch.float64).to(dtype))


def _gradients(impl, scene: Scene, use_bg: bool, absgrad: bool) -> dict[str, Optional[Tensor]]:
    (colors, alphas), leaves = _render(impl, scene, use_bg, absgrad=absgrad, requires_grad=True)
    w_colors, w_alphas = _loss_weights(scene, 5)
    ((colors * w_colors).sum() + (alphas * w_alphas).sum()).backward()
    grads = dict(zip(("means2d", "conics", "colors", "opacities", "backgrounds"), (t.grad for t in leaves)))
    grads["absgrad"] = getattr(leaves[0], "absgrad", None)
    return grads


def _assert_grads_close(got: dict, expected: dict, rtol: float) -> None:
    """Each gradient within rtol of the reference, relative to that gradient's largest entry."""
    for name, e in expected.items():
        g = got[name]
        if e is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert g is not None and g.shape == e.shape and g.dtype == e.dtype, f"{name}: missing or misshapen"
        assert e.abs().max() > 0, f"{name}: the reference gradient is all zero; the test would prove nothing"
        err = float((g - e).abs().max() / e.abs().max())
        assert err <= rtol, f"{name}: max error {err:.3g} of the largest entry (allowed {rtol:.1g})"


@pytest.mark.parametrize("kind", ["mixed", "stack", "needles"])
@pytest.mark.parametrize("use_bg", [True, False])
def test_rasterize_backward_float64(kind: str, use_bg: bool) -> None:
    scene = make_scene(6, torch.float64, D=4 if use_bg else 3, kind=kind)
    expected = _gradients(ref, scene, use_bg, absgrad=True)
    got = _gradients(cpu, scene, use_bg, absgrad=True)
    _assert_grads_close(got, expected, rtol=1e-9)


def test_rasterize_backward_float32() -> None:
    scene = make_scene(7, torch.float32)
    expected = _gradients(ref, scene, use_bg=True, absgrad=True)
    got = _gradients(cpu, scene, use_bg=True, absgrad=True)
    _assert_grads_close(got, expected, rtol=1e-4)


def test_absgrad_only_when_asked() -> None:
    scene = make_scene(8, torch.float64)
    grads = _gradients(cpu, scene, use_bg=False, absgrad=False)
    assert grads["absgrad"] is None and grads["backgrounds"] is None
    with_abs = _gradients(cpu, scene, use_bg=False, absgrad=True)
    assert torch.equal(grads["means2d"], with_abs["means2d"])
    assert (with_abs["absgrad"] >= grads["means2d"].abs()).all()
    assert (with_abs["absgrad"] > grads["means2d"].abs() + 1e-6).any(), "per-pixel signs should cancel somewhere"


def test_rasterize_backward_is_deterministic() -> None:
    scene = make_scene(9, torch.float32, kind="stack")
    first = _gradients(cpu, scene, use_bg=True, absgrad=True)
    second = _gradients(cpu, scene, use_bg=True, absgrad=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ----------------------------------------------------------------------------- the reference itself


def test_reference_matches_finite_differences() -> None:
    """Central differences of the reference rasteriser on a smooth tiny scene (float64)."""
    torch.manual_seed(10)
    width, height, tile = 9, 7, 4
    means2d = torch.tensor([[[2.0, 2.5], [6.3, 4.1], [4.2, 3.3], [7.7, 1.2]]], dtype=torch.float64)
    conics = torch.tensor([[[0.12, 0.03, 0.10], [0.09, -0.02, 0.15], [0.20, 0.05, 0.11], [0.10, 0.0, 0.08]]],
                          dtype=torch.float64)
    colors = torch.rand(1, 4, 3, dtype=torch.float64)
    opacities = torch.tensor([[0.7, 0.55, 0.8, 0.6]], dtype=torch.float64)
    backgrounds = torch.rand(1, 3, dtype=torch.float64)
    radii = torch.full((1, 4), 12, dtype=torch.int32)
    depths = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    tile_w, tile_h = math.ceil(width / tile), math.ceil(height / tile)
    _, isect_ids, flatten_ids = ref.isect_tiles(means2d, radii, depths, tile, tile_w, tile_h)
    offsets = ref.isect_offset_encode(isect_ids, 1, tile_w, tile_h)
    inputs = [means2d, conics, colors, opacities, backgrounds]
    w_colors = torch.randn(1, height, width, 3, dtype=torch.float64)
    w_alphas = torch.randn(1, height, width, 1, dtype=torch.float64)

    def loss(m, q, c, o, b) -> Tensor:
        out_c, out_a = ref.rasterize_to_pixels(m, q, c, o, width, height, tile, offsets, flatten_ids, backgrounds=b)
        return (out_c * w_colors).sum() + (out_a * w_alphas).sum()

    # Smoothness precondition: every alpha well inside (1/255, 0.999) and transmittance far above 1e-4.
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    d = means2d[0, :, None, None, :] - torch.stack([xs, ys], -1).double()
    sigma = 0.5 * (conics[0, :, 0, None, None] * d[..., 0] ** 2 + conics[0, :, 2, None, None] * d[..., 1] ** 2) + \
        conics[0, :, 1, None, None] * d[..., 0] * d[..., 1]
    alpha = opacities[0, :, None, None] * torch.exp(-sigma)
    assert (sigma > 0).all() and alpha.min() > 2 / 255 and alpha.max() < 0.99 and (1 - alpha).prod(0).min() > 1e-2

    leaves = [t.clone().requires_grad_(True) for t in inputs]
    loss(*leaves).backward()
    eps = 1e-6
    for i, (x, leaf) in enumerate(zip(inputs, leaves)):
        numeric = torch.zeros_like(x)
        for j in range(x.numel()):
            plus, minus = [t.clone() for t in inputs], [t.clone() for t in inputs]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            numeric.view(-1)[j] = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert numeric.abs().max() > 1e-3
        torch.testing.assert_close(leaf.grad, numeric, rtol=1e-6, atol=1e-8)
