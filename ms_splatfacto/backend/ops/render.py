"""`rasterization` on the aggregate device: gsplat's rendering pipeline, split over the members.

1. projection + SH (`per_member`): each member projects its own Gaussians into every camera;
2. tile intersection (`plan_tiles`): the camera-major key space cut into one range per member;
3. rasterization (`tile_rasterize`): each member renders its tile range from the records it reads.

Per-Gaussian outputs are Gaussian-major aggregates ([N, C, ...], rows where the Gaussians live), so
densification statistics accumulate on the owners; the rendered images are ordinary tensors.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import aggregate, is_aggregate
from ms_splatfacto.backend.aggregate.members import members as members_of
from ms_splatfacto.backend.kernels import get_kernels, kernels_for
from ms_splatfacto.backend.rendering import RenderMode, backgrounds_for, expected_depth
from ms_splatfacto.backend.ops.per_member import per_member
from ms_splatfacto.backend.ops.sh_parts import offset_clamp_min, sh_from_parts
from ms_splatfacto.backend.ops.tile_raster import tile_rasterize
from ms_splatfacto.backend.ops.tiles import plan_tiles

def _on_aggregate(t: Tensor, spec) -> Tensor:
    return t if is_aggregate(t) else aggregate(t, spec, persistent=False)  # an ordinary input: this call's only


def rasterization(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4], need not be normalised
    scales: Tensor,  # [N, 3], activated (not log)
    opacities: Tensor,  # [N], activated (not logit)
    colors: Tensor,  # [N, K, 3] SH coefficients when sh_degree is set (the DC [N, 3] with sh_rest), else [N, D]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, ordinary
    Ks: Tensor,  # [C, 3, 3], ordinary
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
    split_images: bool = False,
    sh_rest: Optional[Tensor] = None,  # [N, K - 1, 3]
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render C cameras from Gaussians on the aggregate device (ordinary tensors count as one member).

    Same images as `gsplat.rasterization(..., packed=False)`: colours [C, H, W, D'] and alphas
    [C, H, W, 1] (ordinary tensors on every rank), or with `split_images` [C * H, W, D'] and
    [C * H, W, 1] aggregates whose rows (camera-major pixel rows) stay on the members that rendered them. The info dict is Gaussian-major: "means2d" [N, C, 2]
    (its gradient, and `absgrad` with `absgrad=True`, are what densification reads), "radii" [N, C],
    "depths", "conics", "opacities" as aggregates, plus "width", "height", "n_cameras", "tile_plan".
    """
    N, C = means.shape[0], viewmats.shape[0]
    assert means.shape == (N, 3) and quats.shape == (N, 4) and scales.shape == (N, 3), "bad Gaussian shapes"
    assert opacities.shape == (N,), f"opacities must be [N], got {tuple(opacities.shape)}"
    assert viewmats.shape == (C, 4, 4) and Ks.shape == (C, 3, 3), "bad camera shapes"
    assert rasterize_mode in ("classic", "antialiased"), f"unknown rasterize_mode {rasterize_mode!r}"
    assert not is_aggregate(viewmats) and not is_aggregate(Ks), "cameras are replicated, ordinary tensors"
    spec = means.members if is_aggregate(means) else members_of(str(means.device))
    assert sh_rest is None or (sh_degree is not None and colors.shape == sh_rest.shape[:1] + (3,)), (
        "sh_rest [N, K - 1, 3] goes with sh_degree and the DC coefficients [N, 3] as colors"
    )
    inputs = (means, quats, scales, opacities, colors) + ((sh_rest,) if sh_rest is not None else ())
    rowed = tuple(_on_aggregate(t, spec) for t in inputs)
    means = rowed[0]
    kernel_set = get_kernels(kernels) if kernels else kernels_for(means.device)
    with_depth = render_mode in ("RGB+D", "RGB+ED", "D", "ED")
    depth_only = render_mode in ("D", "ED")

    def project_member(d, means, quats, scales, opacities, colors, *rest_and_cameras):
        *rest, viewmats, Ks, campos = rest_and_cameras
        radii, means2d, depths, conics, comps = kernel_set.project(
            means, quats, scales, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
            far_plane=far_plane, radius_clip=radius_clip, calc_compensations=rasterize_mode == "antialiased",
        )
        opac = opacities[None, :].expand(C, -1)
        if comps is not None:
            opac = opac * comps
        if depth_only:
            feats = depths[..., None]
        else:
            if sh_degree is None:
                feats = colors[None].expand(C, -1, -1)
            else:
                if rest:  # the DC and higher orders apart: no [n, K, 3] concatenation (see sh_parts)
                    feats = sh_from_parts(kernel_set.spherical_harmonics, sh_degree, means, campos, colors, rest[0], masks=radii > 0,
                                          kernel_bwd=getattr(kernel_set, "spherical_harmonics_backward", None))
                else:
                    dirs = means[None, :, :] - campos[:, None, :]  # [C, n, 3]
                    feats = kernel_set.spherical_harmonics(sh_degree, dirs, colors, masks=radii > 0)
                feats = offset_clamp_min(feats, 0.5)
            if with_depth:
                feats = torch.cat((feats, depths[..., None]), dim=-1)
        return tuple(x.transpose(0, 1) for x in (means2d, conics, feats, opac, depths, radii))  # per_member copies them once

    if sh_degree is not None and sh_rest is None:
        assert colors.dim() == 3 and colors.shape[-1] == 3, "SH colours must be [N, K, 3]"
    campos = torch.inverse(viewmats)[:, :3, 3]  # [C, 3] camera centres, once for all members
    means2d, conics, feats, opac, depths, radii = per_member(project_member, rowed, (viewmats, Ks, campos))
    plan = plan_tiles(kernel_set, means2d, radii, depths, width, height, tile_size)
    render_colors, render_alphas = tile_rasterize(
        plan, kernel_set, means2d, conics, feats, opac, backgrounds_for(backgrounds, render_mode), absgrad, split_images
    )
    render_colors = expected_depth(render_colors, render_alphas, render_mode)
    info = {
        "gaussian_major": True,
        "radii": radii,
        "means2d": means2d,
        "tile_width": math.ceil(width / tile_size),
        "tile_height": math.ceil(height / tile_size),
        "tile_size": tile_size,
        "depths": depths,
        "conics": conics,
        "opacities": opac,
        "tile_plan": plan,
        "n_isects": plan.n_isects,
        "width": width,
        "height": height,
        "n_cameras": C,
    }
    return render_colors, render_alphas, info
