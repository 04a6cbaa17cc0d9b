"""The splatting operators split over CPU members equal the single-device kernels and the reference:
forward outputs, gradients of every input, intersection order, and the exchange byte counts."""

from __future__ import annotations

import math

import pytest
import torch

from ms_splatfacto.backend import rasterization as single_device
from ms_splatfacto.backend.aggregate import (
    exchange_totals,
    fallback_counts,
    parameter,
    reset_exchange,
    reset_fallback_counts,
    to_plain,
)
from ms_splatfacto.backend.kernels import get_kernels, reference
from ms_splatfacto.backend.ops.render import rasterization
from tests.test_backend import random_scene

GAUSSIAN_INPUTS = ("means", "quats", "scales", "opacities", "colors")
SETTINGS = dict(width=75, height=52, sh_degree=3, render_mode="RGB+ED", absgrad=True, rasterize_mode="antialiased")


def scene_with_blind_member(n: int, cameras: int, members: int, dtype=torch.float64) -> dict:
    """random_scene whose last member's rows all sit behind the cameras (it owns no visible Gaussian)."""
    scene = random_scene(n=n, cameras=cameras, dtype=dtype)
    last = n - n // members
    scene["means"][last:, 2] = -4.0
    return scene


def render_both(scene: dict, spec: str, kernels: str, single_kernels: str = "cpu"):
    """(single-device outputs, info, grads), (distributed outputs, info, grads) under one loss."""
    plain = {k: v.clone().requires_grad_(k in GAUSSIAN_INPUTS) for k, v in scene.items()}
    agg = {k: parameter(v, spec) if k in GAUSSIAN_INPUTS else v.clone() for k, v in scene.items()}
    out, alpha, info = single_device(**plain, kernels=single_kernels, **SETTINGS)
    reset_exchange()
    reset_fallback_counts()
    out2, alpha2, info2 = rasterization(**agg, kernels=kernels, **SETTINGS)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for o, a, i in ((out, alpha, info), (out2, alpha2, info2)):
        i["means2d"].retain_grad()
        ((o * weights).sum() + a.sum()).backward()
    grads = {k: plain[k].grad for k in GAUSSIAN_INPUTS}
    grads2 = {k: to_plain(agg[k].grad) for k in GAUSSIAN_INPUTS}
    return (out, alpha, info, grads), (out2, alpha2, info2, grads2)


@pytest.mark.parametrize("members", [1, 2, 4, 5])
@pytest.mark.parametrize("cameras", [1, 3])
def test_distributed_pipeline_equals_single_device_cpu_kernels(members: int, cameras: int):
    scene = scene_with_blind_member(300, cameras, members)
    (out, alpha, info, grads), (out2, alpha2, info2, grads2) = render_both(scene, f"cpu:{members}", "cpu")
    # Each tile is composited from the same records in the same order: bit-exact images.
    assert torch.equal(out, out2) and torch.equal(alpha, alpha2)
    assert torch.equal(info["radii"], to_plain(info2["radii"]).transpose(0, 1))
    for name in GAUSSIAN_INPUTS:  # partial sums per member: equal up to summation order
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(to_plain(info2["means2d"].grad).transpose(0, 1), info["means2d"].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(to_plain(info2["means2d"].absgrad).transpose(0, 1), info["means2d"].absgrad, rtol=1e-10, atol=1e-12)
    assert fallback_counts() == {}
    plan = info2["tile_plan"]
    last = plan.layout.bounds[-2]
    assert members == 1 or (info["radii"][:, last:] == 0).all(), "the last member must own no visible Gaussian"
    if cameras == 3 and members in (2, 4):
        assert any(w.cam_lo < w.cam_hi for w in plan.work if w is not None), "a camera's tiles should straddle two members"


@pytest.mark.parametrize("members", [2, 5])
def test_float32_gradients_are_bit_exact(members: int):
    """The CPU kernels hand over unrounded float64 partial sums, so a member count changes no bit."""
    scene = scene_with_blind_member(300, 3, members, dtype=torch.float32)
    (out, alpha, info, grads), (out2, alpha2, info2, grads2) = render_both(scene, f"cpu:{members}", "cpu")
    for name in GAUSSIAN_INPUTS:
        assert torch.equal(grads2[name], grads[name]), name
    assert torch.equal(to_plain(info2["means2d"].absgrad).transpose(0, 1), info["means2d"].absgrad)


@pytest.mark.parametrize("members", [1, 4])
def test_distributed_reference_kernels_equal_single_device(members: int):
    """The reference kernel set runs the same split (small scene: it is slow)."""
    scene = scene_with_blind_member(80, 2, members)
    (out, alpha, _, grads), (out2, alpha2, _, grads2) = render_both(scene, f"cpu:{members}", "reference", "reference")
    torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alpha2, alpha, rtol=1e-10, atol=1e-10)
    for name in GAUSSIAN_INPUTS:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-8, atol=1e-8, msg=name)


def test_member_intersection_lists_concatenate_to_the_global_sort():
    scene = random_scene(n=300, cameras=3, dtype=torch.float32)
    kernels = get_kernels("cpu")
    plain_radii, plain_means2d, plain_depths, _, _ = kernels.project(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], 75, 52
    )
    tile_w, tile_h = math.ceil(75 / 16), math.ceil(52 / 16)
    _, ids, flat = kernels.isect_tiles(plain_means2d, plain_radii, plain_depths, 16, tile_w, tile_h)
    agg = {k: parameter(v, "cpu:4") if k in GAUSSIAN_INPUTS else v for k, v in scene.items()}
    with torch.no_grad():
        _, _, info = rasterization(**agg, width=75, height=52, kernels="cpu", sh_degree=3)
    work = [w for w in info["tile_plan"].work if w is not None]
    assert len(work) == 4 and all(w.isect_ids.numel() for w in work)
    assert torch.equal(torch.cat([w.isect_ids for w in work]), ids)
    records = torch.cat([w.records[w.flatten_ids.long()] for w in work])  # row * C + camera
    assert torch.equal((records % 3) * 300 + records // 3, flat.long())  # camera * N + row


def test_projection_per_member_equals_the_kernel():
    scene = random_scene(n=200, cameras=2, dtype=torch.float64)
    kernels = get_kernels("cpu")
    radii, means2d, depths, conics, _ = kernels.project(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], 75, 52
    )
    agg = {k: parameter(v, "cpu:3") if k in GAUSSIAN_INPUTS else v for k, v in scene.items()}
    with torch.no_grad():
        _, _, info = rasterization(**agg, width=75, height=52, kernels="cpu", sh_degree=3)
    for name, expected in (("radii", radii), ("means2d", means2d), ("depths", depths), ("conics", conics)):
        assert torch.equal(to_plain(info[name]).transpose(0, 1), expected), name


def visibility_count(scene: dict, members: int, channels: int, absgrad: bool) -> dict:
    """Remote-read and reduce-scatter bytes derived independently: each visible (camera, Gaussian) record
    is read by every member, other than its owner, that renders a tile its bounding square touches."""
    C, N = scene["viewmats"].shape[0], scene["means"].shape[0]
    width, height, tile = SETTINGS["width"], SETTINGS["height"], 16
    radii, means2d, _, _, _ = reference.project(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], width, height, calc_compensations=True
    )
    tile_w, tile_h = math.ceil(width / tile), math.ceil(height / tile)
    tile_min, tile_max = reference.tile_bounds(means2d, radii, tile, tile_w, tile_h)
    total_tiles = C * tile_w * tile_h
    # even contiguous ranges of whole tile rows (camera-major) and of Gaussian rows, the first ones one longer
    base, extra = divmod(C * tile_h, members)
    starts = [(d * base + min(d, extra)) * tile_w for d in range(members + 1)]
    renderer = [next(d for d in range(members) if starts[d] <= t < starts[d + 1]) for t in range(total_tiles)]
    rows_base, rows_extra = divmod(N, members)
    row_starts = [d * rows_base + min(d, rows_extra) for d in range(members + 1)]
    owner = [next(d for d in range(members) if row_starts[d] <= g < row_starts[d + 1]) for g in range(N)]
    pairs = 0
    for c in range(C):
        for g in range(N):
            if radii[c, g] <= 0:
                continue
            (x0, y0), (x1, y1) = tile_min[c, g].tolist(), tile_max[c, g].tolist()
            readers = {renderer[(c * tile_h + ty) * tile_w + tx] for ty in range(y0, y1) for tx in range(x0, x1)}
            pairs += len(readers - {owner[g]})
    record = (2 + 3 + channels + 1) * 4
    # gradients travel as the CPU kernels' unrounded float64 sums: twice the bytes of a float32 record
    return {"remote_read": pairs * record, "reduce_scatter": 2 * pairs * (record + (8 if absgrad else 0))}


@pytest.mark.parametrize("members", [2, 3, 4])  # 3 members: ranges of tile rows differ from ranges of tiles
def test_exchange_bytes_match_a_count_from_visibility(members: int):
    scene = random_scene(n=250, cameras=2, dtype=torch.float32)
    agg = {k: parameter(v, f"cpu:{members}") if k in GAUSSIAN_INPUTS else v for k, v in scene.items()}
    reset_exchange()
    out, alpha, _ = rasterization(**agg, kernels="cpu", **SETTINGS)
    (out.sum() + alpha.sum()).backward()
    measured = exchange_totals()
    expected = visibility_count(scene, members, channels=4, absgrad=True)  # RGB + expected depth
    assert expected["remote_read"] > 0
    assert measured["remote_read"] == expected["remote_read"]
    assert measured["reduce_scatter"] == expected["reduce_scatter"]


def test_one_member_exchanges_nothing():
    scene = random_scene(n=100, cameras=2)
    agg = {k: parameter(v, "cpu:1") if k in GAUSSIAN_INPUTS else v for k, v in scene.items()}
    reset_exchange()
    out, alpha, _ = rasterization(**agg, kernels="cpu", **SETTINGS)
    (out.sum() + alpha.sum()).backward()
    assert sum(exchange_totals().values()) == 0
