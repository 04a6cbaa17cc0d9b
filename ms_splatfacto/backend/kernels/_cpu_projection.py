"""C++/OpenMP projection and spherical-harmonics kernels (`csrc/cpu/projection.cpp`).

Same signatures and return conventions as `reference.project` / `reference.spherical_harmonics`;
gradients are hand-written VJPs of the reference computation (so they match its autograd). The
kernels are compiled on the first call, not at import, so importing this module needs torch alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ms_splatfacto.backend import build



class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
                radius_clip, calc_compensations):
        radii, means2d, depths, conics, comps = build.cpu_ops().project_fwd(
            means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
            calc_compensations,
        )
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, radii)
        ctx.width, ctx.height, ctx.eps2d = width, height, eps2d
        ctx.calc_compensations = calc_compensations
        ctx.mark_non_differentiable(radii)
        if not calc_compensations:
            ctx.mark_non_differentiable(comps)  # an empty placeholder
        return radii, means2d, depths, conics, comps

    @staticmethod
    @once_differentiable
    def backward(ctx, v_radii, v_means2d, v_depths, v_conics, v_comps):
        means, quats, scales, viewmats, Ks, radii = ctx.saved_tensors
        v_means, v_quats, v_scales = build.cpu_ops().project_bwd(
            means, quats, scales, viewmats, Ks, ctx.width, ctx.height, ctx.eps2d, radii,
            v_means2d, v_depths, v_conics, v_comps if ctx.calc_compensations else None,
        )
        return v_means, v_quats, v_scales, None, None, None, None, None, None, None, None, None


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4], need not be normalised
    scales: Tensor,  # [N, 3]
    viewmats: Tensor,  # [C, 4, 4], world-to-camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """EWA projection, as `reference.project`: (radii, means2d, depths, conics, compensations or None).

    Gradients reach means, quats and scales; camera-pose and intrinsics gradients are not
    implemented, so asking for them raises instead of silently returning none.
    """
    N, C = means.shape[0], viewmats.shape[0]
    assert means.shape == (N, 3), f"means must be [N, 3], got {tuple(means.shape)}"
    assert quats.shape == (N, 4), f"quats must be [{N}, 4], got {tuple(quats.shape)}"
    assert scales.shape == (N, 3), f"scales must be [{N}, 3], got {tuple(scales.shape)}"
    assert viewmats.shape == (C, 4, 4), f"viewmats must be [C, 4, 4], got {tuple(viewmats.shape)}"
    assert Ks.shape == (C, 3, 3), f"Ks must be [{C}, 3, 3], got {tuple(Ks.shape)}"
    if torch.is_grad_enabled() and (viewmats.requires_grad or Ks.requires_grad):
        raise NotImplementedError(
            "Camera-pose gradients (viewmats / Ks requiring grad) are not supported by the CPU kernels; "
            "detach the cameras or use the reference kernels (--pipeline.model.kernels reference)."
        )
    radii, means2d, depths, conics, comps = _Project.apply(
        means, quats, scales, viewmats, Ks, int(width), int(height), float(eps2d), float(near_plane),
        float(far_plane), float(radius_clip), bool(calc_compensations),
    )
    return radii, means2d, depths, conics, (comps if calc_compensations else None)


class _SphericalHarmonics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, degree, dirs, coeffs, masks):
        ctx.degree = degree
        ctx.save_for_backward(dirs, coeffs, masks)
        return build.cpu_ops().sh_fwd(degree, dirs, coeffs, masks)

    @staticmethod
    @once_differentiable
    def backward(ctx, v_colors):
        dirs, coeffs, masks = ctx.saved_tensors
        v_dirs, v_coeffs = build.cpu_ops().sh_bwd(ctx.degree, dirs, coeffs, masks, v_colors)
        return None, v_dirs, v_coeffs, None


def spherical_harmonics_backward(
    degree: int,
    dirs: Tensor,  # [C, N, 3]
    coeffs: Tensor,  # [N, K, 3]
    masks: Optional[Tensor],  # [C, N] bool
    v_colors: Tensor,  # [C, N, 3]
) -> Tuple[Tensor, Tensor]:  # v_dirs [C, N, 3], v_coeffs [N, K, 3]
    """The gradients `spherical_harmonics`' backward gives, called directly: for callers that hold the
    inputs and recompute nothing (no autograd graph, no forward)."""
    assert v_colors.shape == dirs.shape, f"v_colors must be {tuple(dirs.shape)}, got {tuple(v_colors.shape)}"
    return build.cpu_ops().sh_bwd(int(degree), dirs, coeffs, masks, v_colors)


def spherical_harmonics(
    degree: int,
    dirs: Tensor,  # [C, N, 3], not necessarily normalised
    coeffs: Tensor,  # [N, K, 3], K >= (degree + 1) ** 2
    masks: Optional[Tensor] = None,  # [C, N] bool; False gives zero colour and gradient
) -> Tensor:
    """View-dependent colours [C, N, 3], as `reference.spherical_harmonics`."""
    assert 0 <= degree <= 3, f"SH degree must be in [0, 3], got {degree}"
    num_bases = (degree + 1) ** 2
    assert dirs.dim() == 3 and dirs.shape[-1] == 3, f"dirs must be [C, N, 3], got {tuple(dirs.shape)}"
    C, N = dirs.shape[:2]
    assert coeffs.dim() == 3 and coeffs.shape[0] == N and coeffs.shape[1] >= num_bases and coeffs.shape[2] == 3, (
        f"coeffs must be [{N}, K >= {num_bases}, 3] for degree {degree}, got {tuple(coeffs.shape)}"
    )
    assert masks is None or masks.shape == (C, N), f"masks must be [{C}, {N}], got {tuple(masks.shape)}"
    return _SphericalHarmonics.apply(int(degree), dirs, coeffs, masks)
