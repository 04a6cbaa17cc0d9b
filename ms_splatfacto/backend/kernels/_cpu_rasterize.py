"""CPU tile intersection and rasterisation: the C++/OpenMP ops of `csrc/cpu/isect.cpp`
and `csrc/cpu/rasterize.cpp`.

Same signatures and results as `reference.isect_tiles`, `reference.isect_offset_encode` and
`reference.rasterize_to_pixels`; the rasteriser's backward pass is hand-written in C++ instead of
autograd through a [pixels, Gaussians-per-tile] graph, so it scales to real scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class RasterSaved:
    """What the backward reads of a forward: its inputs and the per-pixel last composited intersection
    (means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, last_ids), and
    (width, height, tile_size)."""

    tensors: Tuple[Optional[Tensor], ...]
    image: Tuple[int, int, int]


def _forward(means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids):
    render_colors, render_alphas, last_ids = build.cpu_ops().rasterize_to_pixels_fwd(
        means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids
    )
    saved = RasterSaved((means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, last_ids),
                        (width, height, tile_size))
    return render_colors, render_alphas, saved


def _backward(saved: RasterSaved, v_render_colors: Tensor, v_render_alphas: Tensor, absgrad: bool, float64: bool):
    means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, last_ids = saved.tensors
    return build.cpu_ops().rasterize_to_pixels_bwd(
        means2d, conics, colors, opacities, backgrounds, *saved.image, isect_offsets, flatten_ids, last_ids,
        v_render_colors.contiguous(), v_render_alphas.contiguous(), absgrad, float64,
    )


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
        render_colors, render_alphas, saved = _forward(
            means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids
        )
        ctx.save_for_backward(*saved.tensors)
        ctx.image = saved.image
        ctx.absgrad, ctx.float64_sums = absgrad, float64_sums
        return render_colors, render_alphas

    @staticmethod
    @once_differentiable
    def backward(ctx, v_render_colors: Tensor, v_render_alphas: Tensor):  # [C, H, W, D], [C, H, W, 1]
        saved = RasterSaved(tuple(ctx.saved_tensors), ctx.image)
        means2d, colors, backgrounds = saved.tensors[0], saved.tensors[2], saved.tensors[4]
        absgrad = ctx.absgrad and ctx.needs_input_grad[0]
        v_means2d, v_means2d_abs, v_conics, v_colors, v_opacities, v_backgrounds = _backward(
            saved, v_render_colors, v_render_alphas, absgrad, ctx.float64_sums is not None
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
    kernel: `forward`/`backward` pairs (a Gaussian evaluated at a pixel still compositing, in the SIMD
    vectors its reach box meets) and `forward_lanes`/`backward_lanes` (every SIMD lane composited,
    padding and finished pixels included). Both passes first compute a vector's exponent and pass
    over the Gaussian there when no lane still compositing is within log(255 opacity) (nothing can
    composite; the forward filters such rows out without a branch, the backward's replay skips them):
    those vectors count in neither figure, so a pair is a full evaluation (alpha, transmittance,
    colour). `evaluations` and `lanes` are the totals of both passes."""
    fwd, fwd_lanes, bwd, bwd_lanes = (int(v) for v in build.cpu_ops().raster_counts(reset))
    return {"forward": fwd, "forward_lanes": fwd_lanes, "backward": bwd, "backward_lanes": bwd_lanes,
            "evaluations": fwd + bwd, "lanes": fwd_lanes + bwd_lanes}


def _check_inputs(means2d, conics, colors, opacities, isect_offsets, flatten_ids, backgrounds) -> None:
    """The shapes both entry points (autograd and direct) take, named where they are wrong."""
    C, N, D = colors.shape
    assert means2d.shape == (C, N, 2), f"means2d must be [C, N, 2], got {tuple(means2d.shape)}"
    assert conics.shape == (C, N, 3), f"conics must be [C, N, 3], got {tuple(conics.shape)}"
    assert opacities.shape == (C, N), f"opacities must be [C, N], got {tuple(opacities.shape)}"
    assert isect_offsets.dim() == 3 and isect_offsets.shape[0] == C, "isect_offsets must be [C, tile_height, tile_width]"
    assert flatten_ids.dim() == 1, f"flatten_ids must be [M], got {tuple(flatten_ids.shape)}"
    assert backgrounds is None or backgrounds.shape == (C, D), f"backgrounds must be [C, D] = [{C}, {D}]"


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
    _check_inputs(means2d, conics, colors, opacities, isect_offsets, flatten_ids, backgrounds)
    return _RasterizeToPixels.apply(
        means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets.contiguous(),
        flatten_ids.contiguous(), absgrad, float64_sums,
    )


def rasterize_to_pixels_direct(
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
) -> Tuple[Tensor, Tensor, RasterSaved]:
    """`rasterize_to_pixels` without autograd, for a caller that runs the backward itself
    (`rasterize_to_pixels_direct_backward`): colours [C, H, W, D], alphas [C, H, W, 1] and what the
    backward reads."""
    _check_inputs(means2d, conics, colors, opacities, isect_offsets, flatten_ids, backgrounds)
    with torch.no_grad():
        return _forward(means2d.detach(), conics.detach(), colors.detach(), opacities.detach(), backgrounds, width, height,
                        tile_size, isect_offsets.contiguous(), flatten_ids.contiguous())


def rasterize_to_pixels_direct_backward(
    saved: RasterSaved,
    v_render_colors: Tensor,  # [C, H, W, D]
    v_render_alphas: Tensor,  # [C, H, W, 1]
    absgrad: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """The per-Gaussian gradients of a direct forward as unrounded (float64) sums, what
    `rasterize_to_pixels(..., float64_sums={})` fills in its backward: "means2d", "conics", "colors",
    "opacities" and, with `absgrad`, "absgrad" (else None). Nothing is rounded to float32."""
    v_means2d, v_abs, v_conics, v_colors, v_opacities, _ = _backward(saved, v_render_colors, v_render_alphas, absgrad, True)
    return {"means2d": v_means2d, "conics": v_conics, "colors": v_colors, "opacities": v_opacities,
            "absgrad": v_abs if absgrad else None}
