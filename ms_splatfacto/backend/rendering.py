"""`rasterization`: gsplat's unpacked rendering pipeline over an interchangeable kernel set."""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.kernels import get_kernels, kernels_for

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]


def backgrounds_for(backgrounds: Optional[Tensor], render_mode: RenderMode) -> Optional[Tensor]:  # [C, D]
    """Backgrounds of the rendered channels: depth channels composite over zero."""
    if backgrounds is None or render_mode == "RGB":
        return backgrounds
    zero_depth = backgrounds.new_zeros(backgrounds.shape[0], 1)
    return zero_depth if render_mode in ("D", "ED") else torch.cat([backgrounds, zero_depth], dim=-1)


def expected_depth(render_colors: Tensor, render_alphas: Tensor, render_mode: RenderMode) -> Tensor:
    """"ED" modes: the last channel (alpha-weighted depth) divided by alpha; other modes unchanged.
    render_colors [C, H, W, D'], render_alphas [C, H, W, 1]."""
    if render_mode not in ("ED", "RGB+ED"):
        return render_colors
    return torch.cat([render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1)


def rasterization(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4], need not be normalised
    scales: Tensor,  # [N, 3], activated (not log)
    opacities: Tensor,  # [N], activated (not logit)
    colors: Tensor,  # [N, K, 3] SH coefficients when sh_degree is set, else [N, D] or [C, N, D]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    render_mode: RenderMode = "RGB",
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    kernels: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render C cameras; same contract as `gsplat.rasterization(..., packed=False)`.

    Returns colours [C, H, W, D'] (D' = D, D + 1 with depth, or 1 for depth only; "ED" modes give the
    expected depth, i.e. depth divided by alpha), alphas [C, H, W, 1] and an info dict with the
    entries gsplat's strategies read ("means2d" with its gradient, "radii", "width", "height",
    "n_cameras", ...). `kernels` names a kernel set (default: the one for `means.device`).
    """
    N, C = means.shape[0], viewmats.shape[0]
    assert means.shape == (N, 3) and quats.shape == (N, 4) and scales.shape == (N, 3), "bad Gaussian shapes"
    assert opacities.shape == (N,), f"opacities must be [N], got {tuple(opacities.shape)}"
    assert viewmats.shape == (C, 4, 4) and Ks.shape == (C, 3, 3), "bad camera shapes"
    assert rasterize_mode in ("classic", "antialiased"), f"unknown rasterize_mode {rasterize_mode!r}"
    kernels = get_kernels(kernels) if kernels else kernels_for(means.device)

    radii, means2d, depths, conics, compensations = kernels.project(
        means, quats, scales, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, calc_compensations=rasterize_mode == "antialiased",
    )
    opacities = opacities.repeat(C, 1)  # [C, N]
    if compensations is not None:
        opacities = opacities * compensations

    if sh_degree is None:
        colors = colors.expand(C, -1, -1) if colors.dim() == 2 else colors
    else:
        assert colors.dim() == 3 and colors.shape[-1] == 3, "SH colours must be [N, K, 3]"
        campos = torch.inverse(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
        colors = kernels.spherical_harmonics(sh_degree, dirs, colors, masks=radii > 0)
        colors = torch.clamp_min(colors + 0.5, 0.0)

    if render_mode in ("RGB+D", "RGB+ED"):
        colors = torch.cat((colors, depths[..., None]), dim=-1)
    elif render_mode in ("D", "ED"):
        colors = depths[..., None]
    backgrounds = backgrounds_for(backgrounds, render_mode)

    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tiles_per_gauss, isect_ids, flatten_ids = kernels.isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height
    )
    isect_offsets = kernels.isect_offset_encode(isect_ids, C, tile_width, tile_height)
    render_colors, render_alphas = kernels.rasterize_to_pixels(
        means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids,
        backgrounds=backgrounds, absgrad=absgrad,
    )
    render_colors = expected_depth(render_colors, render_alphas, render_mode)
    info = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tiles_per_gauss": tiles_per_gauss,
        "isect_ids": isect_ids,
        "flatten_ids": flatten_ids,
        "isect_offsets": isect_offsets,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": C,
    }
    return render_colors, render_alphas, info
