"""Locality on a real scene: the Morton order puts the Gaussians one member reads from another on fewer
pages than a random order does (lund_tiny's SfM points, four cameras per step, cpu:4)."""

from __future__ import annotations

from pathlib import Path

import torch
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.models.splatfacto import get_viewmat

from ms_splatfacto.backend.aggregate import exchange_totals, parameter, reset_exchange
from ms_splatfacto.backend.morton import morton_order
from ms_splatfacto.backend.ops.render import rasterization


def lund_tiny_gaussians(lund_tiny: Path):
    """Gaussians at lund_tiny's SfM points (scales from neighbour distances), and its training cameras."""
    outputs = ColmapDataParserConfig(data=lund_tiny, colmap_path=Path("sparse/0")).setup().get_dataparser_outputs("train")
    points = outputs.metadata["points3D_xyz"].float()
    distances = torch.cdist(points, points).fill_diagonal_(float("inf"))
    scale = distances.topk(3, largest=False).values.mean(1, keepdim=True).clamp(min=1e-4)
    g = torch.Generator().manual_seed(0)
    n = points.shape[0]
    gaussians = dict(
        means=points, quats=torch.randn(n, 4, generator=g), scales=scale.repeat(1, 3),
        opacities=torch.full((n,), 0.5), colors=torch.rand(n, 3, generator=g),
    )
    return gaussians, outputs.cameras


def traffic(gaussians: dict, order: torch.Tensor, cameras, members: int, batch: int) -> tuple[int, int]:
    """(remote-read record bytes, remote-read page bytes) of rendering every camera, `batch` per step."""
    agg = {name: parameter(value[order], f"cpu:{members}") for name, value in gaussians.items()}
    viewmats, Ks = get_viewmat(cameras.camera_to_worlds), cameras.get_intrinsics_matrices()
    width, height = int(cameras.width[0]), int(cameras.height[0])
    records = pages = 0
    for start in range(0, viewmats.shape[0] - batch + 1, batch):
        reset_exchange()
        with torch.no_grad():
            _, _, info = rasterization(
                **agg, viewmats=viewmats[start : start + batch], Ks=Ks[start : start + batch], width=width,
                height=height, kernels="cpu",
            )
        records += exchange_totals()["remote_read"]
        pages += info["tile_plan"].remote_page_bytes([8, 12, 12, 4])  # means2d, conics, colours, opacities
    return records, pages


def test_morton_order_reads_fewer_remote_pages_than_random(lund_tiny: Path):
    gaussians, cameras = lund_tiny_gaussians(lund_tiny)
    shuffled = torch.randperm(gaussians["means"].shape[0], generator=torch.Generator().manual_seed(1))
    morton = traffic(gaussians, morton_order(gaussians["means"]), cameras, members=4, batch=4)
    random = traffic(gaussians, shuffled, cameras, members=4, batch=4)
    print(f"remote reads: records {morton[0]} vs {random[0]} B, pages {morton[1]} vs {random[1]} B (Morton vs random)")
    assert morton[1] < 0.9 * random[1]
    assert morton[0] <= random[0]
