"""Bytes crossing between members: the measured counts of the exchange module, a Grendel-style count for
the same step, and a synthetic scene rendered on up to 64 virtual members.

Grendel-style count (Zhao et al., "On Scaling Up 3D Gaussian Splatting Training", 2024): the Gaussians
are split by rows, the image by tiles, and every member that renders a tile a visible Gaussian's bounding
square touches receives that Gaussian's projected record (2D mean, conic, colour channels, opacity) through
an all-to-all, and sends its gradient back. "all pairs" counts every (camera, Gaussian, rendering member)
triple, as Grendel's all-to-all buffers do (a member's records to itself included); "remote pairs" leaves
out those whose renderer is the owner, i.e. what would actually cross between GPUs.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from ms_splatfacto.backend.aggregate import exchange_totals, is_aggregate, parameter, reset_exchange, to_plain
from ms_splatfacto.backend.kernels import reference
from ms_splatfacto.backend.morton import morton_order
from ms_splatfacto.backend.ops.render import rasterization
from ms_splatfacto.backend.ops.tiles import even_bounds


def grendel_count(info: Dict, members: int, channels: int = 3) -> Dict[str, int]:
    """Grendel-style bytes for the step that produced `info` (Gaussian-major, from our rasterization)."""
    radii, means2d = info["radii"], info["means2d"]
    bounds = list(radii._layout.bounds) if is_aggregate(radii) else [0, radii.shape[0]]
    radii = to_plain(radii).transpose(0, 1)  # [C, N]
    means2d = to_plain(means2d.detach()).transpose(0, 1)  # [C, N, 2]
    C, N = radii.shape
    tile, tw, th = info["tile_size"], info["tile_width"], info["tile_height"]
    tile_min, tile_max = reference.tile_bounds(means2d, radii, tile, tw, th)
    extent = (tile_max - tile_min).long()
    counts = (extent[..., 0] * extent[..., 1] * (radii > 0)).flatten()
    flat = torch.repeat_interleave(torch.arange(C * N), counts)
    k = torch.arange(flat.numel()) - (torch.cumsum(counts, 0) - counts)[flat]
    w = extent.reshape(-1, 2)[flat, 0].clamp(min=1)
    tx = tile_min.reshape(-1, 2)[flat, 0].long() + k % w
    ty = tile_min.reshape(-1, 2)[flat, 1].long() + k // w
    key = (flat // N) * (tw * th) + ty * tw + tx  # camera-major tile number
    renderer = torch.bucketize(key, torch.tensor([b * tw for b in even_bounds(C * th, members)][1:-1]), right=True)  # whole tile rows
    pairs = torch.unique(flat * members + renderer)
    owner = torch.bucketize((pairs // members) % N, torch.tensor(bounds[1:-1], dtype=torch.long), right=True)
    remote = int((owner != pairs % members).sum())
    record = (2 + 3 + channels + 1) * 4
    return {"pairs": int(pairs.numel()), "remote_pairs": remote, "record_bytes": record,
            "all_pairs_bytes": 2 * record * int(pairs.numel()), "remote_bytes": 2 * record * remote}


def synthetic_scene(n: int, cameras: int = 2, sh_degree: int = 3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """N Gaussians in a 4 x 3 x 2 box five units in front of `cameras` cameras side by side, 256x192."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([4.0, 3.0, 2.0]) + torch.tensor([0.0, 0.0, 5.0])
    quats = torch.randn(n, 4, generator=g)
    viewmats = torch.eye(4).repeat(cameras, 1, 1)
    viewmats[:, 0, 3] = torch.linspace(-0.5, 0.5, cameras) if cameras > 1 else 0.0
    Ks = torch.tensor([[200.0, 0.0, 128.0], [0.0, 200.0, 96.0], [0.0, 0.0, 1.0]]).repeat(cameras, 1, 1)
    return {
        "means": means,
        "quats": quats / quats.norm(dim=-1, keepdim=True),
        "scales": torch.full((n, 3), 0.6 / n ** (1 / 3)),
        "opacities": torch.full((n,), 0.5),
        "colors": torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3,
        "viewmats": viewmats,
        "Ks": Ks,
    }


def render_exchange(scene: Dict[str, torch.Tensor], members: int, morton: bool = True) -> Dict[str, object]:
    """Exchange bytes of one forward + backward of `scene` on cpu:<members> (CPU kernels, SH degree 3)."""
    scene = dict(scene)
    if morton:
        order = morton_order(scene["means"])
        scene.update({k: scene[k][order] for k in ("means", "quats", "scales", "opacities", "colors")})
    gaussians = {k: parameter(scene[k], f"cpu:{members}") for k in ("means", "quats", "scales", "opacities", "colors")}
    reset_exchange()
    out, alpha, info = rasterization(**gaussians, viewmats=scene["viewmats"], Ks=scene["Ks"], width=256, height=192,
                                     sh_degree=3, kernels="cpu")
    (out.sum() + alpha.sum()).backward()
    totals = exchange_totals()
    rows = list(gaussians["means"]._layout.counts)
    return {"members": members, "gaussians": scene["means"].shape[0], "rows_min": min(rows), "rows_max": max(rows),
            "n_isects": int(info["n_isects"]), **totals, "total": sum(totals.values()), "grendel": grendel_count(info, members)}


def simulate(n: int, member_counts: List[int], cameras: int = 2) -> List[Dict[str, object]]:
    """The synthetic scene on each member count (Morton order), plus a few-rows-per-member case."""
    scene = synthetic_scene(n, cameras)
    runs = [render_exchange(scene, m) for m in member_counts]
    few = max(member_counts)
    runs.append({**render_exchange(synthetic_scene(2 * few + 3, cameras), few), "case": "few rows per member"})
    return runs


def per_step_bytes(totals: Dict[str, int]) -> int:
    return sum(totals.values())


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan
