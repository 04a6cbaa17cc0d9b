"""CUDA kernel set: gsplat 1.4.0's kernels behind the reference interface (unpacked mode)."""

from __future__ import annotations

from typing import Optional, Tuple

from gsplat.cuda import _wrapper as gs
from torch import Tensor


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    return gs.fully_fused_projection(
        means, None, quats, scales, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, packed=False, calc_compensations=calc_compensations,
    )


def spherical_harmonics(
    degree: int,
    dirs: Tensor,  # [C, N, 3]
    coeffs: Tensor,  # [N, K, 3]
    masks: Optional[Tensor] = None,  # [C, N]
) -> Tensor:
    return gs.spherical_harmonics(degree, dirs, coeffs.expand(dirs.shape[0], -1, -1, -1), masks=masks)


def isect_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> Tuple[Tensor, Tensor, Tensor]:
    return gs.isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, packed=False)


def isect_offset_encode(isect_ids: Tensor, n_cameras: int, tile_width: int, tile_height: int) -> Tensor:
    return gs.isect_offset_encode(isect_ids, n_cameras, tile_width, tile_height)


def rasterize_to_pixels(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [C, N]
    width: int,
    height: int,
    tile_size: int,
    isect_offsets: Tensor,  # [C, tile_height, tile_width]
    flatten_ids: Tensor,  # [M]
    backgrounds: Optional[Tensor] = None,  # [C, D]
    absgrad: bool = False,
    float64_sums: Optional[dict] = None,  # accepted for the common interface; this set keeps its own precision
) -> Tuple[Tensor, Tensor]:
    return gs.rasterize_to_pixels(
        means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids,
        backgrounds=backgrounds, packed=False, absgrad=absgrad,
    )
