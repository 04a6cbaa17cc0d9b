"""CPU tile intersection and rasterisation: the C++/OpenMP ops of `csrc/cpu/isect.cpp`
and `csrc/cpu/rasterize.cpp`.

Same signatures and results as `reference.isect_tiles`, `reference.isect_offset_encode` and
`reference.rasterize_to_pixels`; the rasteriser's backward pass is hand-written in C++ instead of
autograd through a [pixels, Gaussians-per-tile] graph, so it scales to real scenes.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ms_splatfacto.backend import build



def isect_tiles(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N] int32
    depths: Tensor,  # [C, N]
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Every (camera, tile, Gaussian) intersection sorted by (camera, tile, depth), ties stable.

    Returns tiles_per_gauss [C, N] int32, isect_ids [M] int64 and flatten_ids [M] int32, bit-exact
    with the reference.
    """
    C, N = radii.shape
    assert means2d.shape == (C, N, 2), f"means2d must be [C, N, 2], got {tuple(means2d.shape)}"
    assert depths.shape == (C, N), f"depths must be [C, N], got {tuple(depths.shape)}"
    return build.cpu_ops().isect_tiles(means2d.detach(), radii.detach(), depths.detach(), tile_size, tile_width, tile_height)


def isect_offset_encode(
    isect_ids: Tensor,  # [M] int64, sorted
    n_cameras: int,
    tile_width: int,
    tile_height: int,
) -> Tensor:
    """Start of each tile's range in the sorted intersections: offsets [C, tile_height, tile_width] int32."""
    assert isect_ids.dim() == 1, f"isect_ids must be [M], got {tuple(isect_ids.shape)}"
    return build.cpu_ops().isect_offset_encode(isect_ids.detach(), n_cameras, tile_width, tile_height)


class _RasterizeToPixels(torch.autograd.Function):
    """Autograd wrapper of the C++ forward/backward pair; the forward's per-pixel last composited
    intersection (last_ids) is kept for the backward pass, which recomputes everything else."""

    @staticmethod
    def forward(
        ctx,
        means2d: Tensor,  # [C, N, 2]
        conics: Tensor,  # [C, N, 3]
        colors: Tensor,  # [C, N, D]
        opacities: Tensor,  # [C, N]
        backgrounds: Optional[Tensor],  # [C, D]
        width: int,
        height: int,
        tile_size: int,
        isect_offsets: Tensor,  # [C, tile_height, tile_width]
        flatten_ids: Tensor,  # [M]
        absgrad: bool,
        float64_sums: Optional[Dict[str, Optional[Tensor]]],
    ) -> Tuple[Tensor, Tensor]:
        render_colors, render_alphas, last_ids = build.cpu_ops().rasterize_to_pixels_fwd(
            means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, last_ids)
        ctx.image = (width, height, tile_size)
        ctx.absgrad, ctx.float64_sums = absgrad, float64_sums
        return render_colors, render_alphas

    @staticmethod
    @once_differentiable
    def backward(ctx, v_render_colors: Tensor, v_render_alphas: Tensor):  # [C, H, W, D], [C, H, W, 1]
        means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, last_ids = ctx.saved_tensors
        absgrad = ctx.absgrad and ctx.needs_input_grad[0]
        v_means2d, v_means2d_abs, v_conics, v_colors, v_opacities, v_backgrounds = build.cpu_ops().rasterize_to_pixels_bwd(
            means2d, conics, colors, opacities, backgrounds, *ctx.image, isect_offsets, flatten_ids, last_ids,
            v_render_colors.contiguous(), v_render_alphas.contiguous(), absgrad, ctx.float64_sums is not None,
        )
        if ctx.float64_sums is not None:
            ctx.float64_sums.update(means2d=v_means2d, conics=v_conics, colors=v_colors, opacities=v_opacities,
                                    absgrad=v_means2d_abs if absgrad else None)
            v_means2d, v_conics, v_colors, v_opacities, v_means2d_abs = (
                t.to(colors.dtype) for t in (v_means2d, v_conics, v_colors, v_opacities, v_means2d_abs)
            )
        if absgrad:
            means2d.absgrad = v_means2d_abs  # read by gsplat's DefaultStrategy, as gsplat's own kernel sets it
        if backgrounds is None or not ctx.needs_input_grad[4]:
            v_backgrounds = None
        return v_means2d, v_conics, v_colors, v_opacities, v_backgrounds, None, None, None, None, None, None, None


def evaluation_counts(reset: bool = False) -> Dict[str, int]:
    """(Gaussian, pixel) evaluations the C++ rasterizer performed since the last reset, counted in the
    kernel: `forward` pairs (a Gaussian evaluated at a pixel still compositing, in the SIMD vectors its
    reach box meets) and `forward_lanes` (every SIMD lane computed, padding and finished pixels
    included). The backward replay first computes each vector's exponent and skips the Gaussian there
    when no lane is within log(255 opacity) (nothing can composite); such vectors count in neither
    `backward` (pairs, as in the forward) nor `backward_lanes`, so the backward counts fall below the
    forward's. `evaluations` and `lanes` are the totals of both passes."""
    fwd, fwd_lanes, bwd, bwd_lanes = (int(v) for v in build.cpu_ops().raster_counts(reset))
    return {"forward": fwd, "forward_lanes": fwd_lanes, "backward": bwd, "backward_lanes": bwd_lanes,
            "evaluations": fwd + bwd, "lanes": fwd_lanes + bwd_lanes}


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
    float64_sums: Optional[Dict[str, Optional[Tensor]]] = None,
) -> Tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of each pixel's tile list (see `reference.rasterize_to_pixels`).

    Returns colours [C, H, W, D] and alphas [C, H, W, 1]. With absgrad, backward also sets
    `means2d.absgrad` [C, N, 2], the sum over pixels of the absolute per-pixel gradient. With
    a `float64_sums` dict, backward fills it with the per-Gaussian gradients before their rounding to
    the input dtype ("means2d", "conics", "colors", "opacities", "absgrad"), so partial sums over
    different tiles can be added without loss.
    """
    C, N, D = colors.shape
    assert means2d.shape == (C, N, 2), f"means2d must be [C, N, 2], got {tuple(means2d.shape)}"
    assert conics.shape == (C, N, 3), f"conics must be [C, N, 3], got {tuple(conics.shape)}"
    assert opacities.shape == (C, N), f"opacities must be [C, N], got {tuple(opacities.shape)}"
    assert isect_offsets.dim() == 3 and isect_offsets.shape[0] == C, "isect_offsets must be [C, tile_height, tile_width]"
    assert flatten_ids.dim() == 1, f"flatten_ids must be [M], got {tuple(flatten_ids.shape)}"
    assert backgrounds is None or backgrounds.shape == (C, D), f"backgrounds must be [C, D] = [{C}, {D}]"
    return _RasterizeToPixels.apply(
        means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets.contiguous(),
        flatten_ids.contiguous(), absgrad, float64_sums,
    )
