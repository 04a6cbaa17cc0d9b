"""Pure-PyTorch reference kernels: the specification the compiled kernels are tested against.

Semantics follow gsplat 1.4.0's CUDA kernels (unpacked mode): the same culling rules, tile keys,
compositing thresholds and output layouts, so that a model trained with one kernel set behaves the
same with another. Gradients come from autograd. Everything is vectorised; memory grows with
pixels x (Gaussians per tile), so this is meant for small scenes (tests, debugging).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
"""A Gaussian whose alpha at a pixel is below this is skipped there."""
ALPHA_MAX = 0.999
"""Alpha is clamped to this so transmittance never reaches zero."""
T_MIN = 1e-4
"""Compositing stops before a Gaussian that would bring transmittance to this or below."""


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from (w, x, y, z) quaternions, normalised first.

    quats: [..., 4] -> [..., 3, 3]
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances R S S^T R^T.

    quats: [N, 4], scales: [N, 3] -> [N, 3, 3]
    """
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


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
    """EWA projection of 3D Gaussians into pinhole cameras.

    Returns radii [C, N] int32 (0 = culled), means2d [C, N, 2], depths [C, N], conics [C, N, 3]
    (upper triangle of the inverse blurred 2D covariance) and compensations [C, N] (or None).
    Culled entries are zero in every output and receive zero gradient.
    """
    N, C = means.shape[0], viewmats.shape[0]
    assert means.shape == (N, 3) and quats.shape == (N, 4) and scales.shape == (N, 3)
    assert viewmats.shape == (C, 4, 4) and Ks.shape == (C, 3, 3)
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", R, quat_scale_to_covar(quats, scales), R)
    tx, ty, tz = means_c.unbind(-1)

    in_depth = (tz > near_plane) & (tz < far_plane)
    tz = torch.where(in_depth, tz, torch.ones_like(tz))  # keeps culled entries finite
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # The Jacobian is evaluated at a point clamped to a slightly enlarged frustum (as in 3DGS).
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx_clamped = tz * torch.clamp(tx / tz, min=-lim_x_neg, max=lim_x_pos)
    ty_clamped = tz * torch.clamp(ty / tz, min=-lim_y_neg, max=lim_y_pos)
    zeros = torch.zeros_like(tz)
    J = torch.stack(
        [fx / tz, zeros, -fx * tx_clamped / tz**2, zeros, fy / tz, -fy * ty_clamped / tz**2], dim=-1
    ).reshape(C, N, 2, 3)
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], dim=-1)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    valid = in_depth & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    mid = 0.5 * (a + c)
    radius = torch.ceil(3.0 * torch.sqrt(mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.01))))
    valid = valid & (radius > radius_clip)
    valid = valid & (means2d[..., 0] + radius > 0) & (means2d[..., 0] - radius < width)
    valid = valid & (means2d[..., 1] + radius > 0) & (means2d[..., 1] - radius < height)

    radii = torch.where(valid, radius.detach(), zeros.detach()).int()
    means2d = torch.where(valid[..., None], means2d, 0.0)
    depths = torch.where(valid, means_c[..., 2], 0.0)
    conics = torch.where(valid[..., None], conics, 0.0)
    compensations = None
    if calc_compensations:
        ratio = torch.clamp(det_orig / det_safe, min=0.0)
        # sqrt has an infinite derivative at 0; keep the gradient finite where the ratio is clamped.
        ratio = torch.where(ratio > 0, ratio, torch.ones_like(ratio))
        compensations = torch.where(valid & (det_orig > 0), torch.sqrt(ratio), 0.0)
    return radii, means2d, depths, conics, compensations


SH_C0 = 0.28209479177387814


def sh_bases(degree: int, dirs: Tensor) -> Tensor:
    """Real spherical-harmonics bases up to `degree` (<= 3) at unit directions, gsplat's ordering.

    dirs: [..., 3] -> [..., (degree + 1) ** 2]
    """
    assert 0 <= degree <= 3, "SH degree must be in [0, 3]"
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2, fc1, fs1 = z * z, x * x - y * y, 2 * x * y
        out += [
            0.5462742152960395 * fs1,
            -1.092548430592079 * z * y,
            0.9461746957575601 * z2 - 0.3153915652525201,
            -1.092548430592079 * z * x,
            0.5462742152960395 * fc1,
        ]
    if degree >= 3:
        fc2, fs2 = x * fc1 - y * fs1, x * fs1 + y * fc1
        tmp_c = -2.285228997322329 * z2 + 0.4570457994644658
        tmp_b = 1.445305721320277 * z
        out += [
            -0.5900435899266435 * fs2,
            tmp_b * fs1,
            tmp_c * y,
            z * (1.865881662950577 * z2 - 1.119528997770346),
            tmp_c * x,
            tmp_b * fc1,
            -0.5900435899266435 * fc2,
        ]
    return torch.stack(out, dim=-1)


def spherical_harmonics(
    degree: int,
    dirs: Tensor,  # [C, N, 3], not necessarily normalised
    coeffs: Tensor,  # [N, K, 3], K >= (degree + 1) ** 2
    masks: Optional[Tensor] = None,  # [C, N] bool; False gives zero colour and gradient
) -> Tensor:
    """View-dependent colours [C, N, 3] from SH coefficients shared by all cameras."""
    num_bases = (degree + 1) ** 2
    assert dirs.dim() == 3 and dirs.shape[-1] == 3
    assert coeffs.dim() == 3 and coeffs.shape[0] == dirs.shape[1] and coeffs.shape[1] >= num_bases
    if masks is not None:
        dirs = torch.where(masks[..., None], dirs, torch.ones_like(dirs))  # finite normalisation
    bases = sh_bases(degree, F.normalize(dirs, dim=-1))  # [C, N, B]
    colors = torch.einsum("cnb,nbk->cnk", bases, coeffs[:, :num_bases])
    if masks is not None:
        colors = torch.where(masks[..., None], colors, 0.0)
    return colors


def tile_bounds(
    means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> Tuple[Tensor, Tensor]:
    """Half-open tile rectangle [min, max) touched by each Gaussian's bounding square.

    means2d: [C, N, 2], radii: [C, N] -> (tile_min [C, N, 2], tile_max [C, N, 2]) int32
    """
    tile_means = means2d.detach() / tile_size
    tile_radii = (radii / tile_size)[..., None]
    upper = torch.tensor([tile_width, tile_height], device=means2d.device)
    tile_min = torch.minimum(torch.floor(tile_means - tile_radii).int().clamp(min=0), upper)
    tile_max = torch.minimum(torch.ceil(tile_means + tile_radii).int().clamp(min=0), upper)
    return tile_min.int(), tile_max.int()


@torch.no_grad()
def isect_tiles(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N] int32
    depths: Tensor,  # [C, N]
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Every (camera, tile, Gaussian) intersection, sorted by (camera, tile, depth).

    Returns tiles_per_gauss [C, N] int32, isect_ids [M] int64 (key: camera << (32 + tile_bits) |
    tile << 32 | float bits of depth) and flatten_ids [M] int32 (camera * N + Gaussian). Ties keep
    emission order (camera, Gaussian, tile row, tile column), i.e. the sort is stable.
    """
    C, N = radii.shape
    assert means2d.shape == (C, N, 2) and depths.shape == (C, N)
    device = means2d.device
    tile_min, tile_max = tile_bounds(means2d, radii, tile_size, tile_width, tile_height)
    extent = (tile_max - tile_min).long()
    tiles_per_gauss = (extent[..., 0] * extent[..., 1]) * (radii > 0)  # [C, N]
    counts = tiles_per_gauss.flatten()
    flat = torch.repeat_interleave(torch.arange(C * N, device=device), counts)  # [M]
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(flat.numel(), device=device) - first[flat]  # rank inside the rectangle
    w = extent.reshape(-1, 2)[flat, 0]
    tx = tile_min.reshape(-1, 2)[flat, 0].long() + k % w.clamp(min=1)
    ty = tile_min.reshape(-1, 2)[flat, 1].long() + k // w.clamp(min=1)
    tile_bits = (tile_width * tile_height).bit_length()
    depth_bits = depths.detach().float().contiguous().view(torch.int32).flatten()[flat].long()
    cam = flat // N
    isect_ids = (cam << (32 + tile_bits)) | ((ty * tile_width + tx) << 32) | (depth_bits & 0xFFFFFFFF)
    isect_ids, order = torch.sort(isect_ids, stable=True)
    return tiles_per_gauss.int(), isect_ids, flat[order].int()


@torch.no_grad()
def isect_offset_encode(isect_ids: Tensor, n_cameras: int, tile_width: int, tile_height: int) -> Tensor:
    """Start of each tile's range in the sorted intersections.

    isect_ids: [M] sorted -> offsets [C, tile_height, tile_width] int32; a tile's range ends where
    the next tile's starts (the last ends at M).
    """
    n_tiles = tile_width * tile_height
    tile_bits = n_tiles.bit_length()
    key = isect_ids >> 32
    linear = (key >> tile_bits) * n_tiles + (key & ((1 << tile_bits) - 1))
    starts = torch.searchsorted(linear, torch.arange(n_cameras * n_tiles, device=isect_ids.device))
    return starts.int().reshape(n_cameras, tile_height, tile_width)


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
    """Front-to-back alpha compositing of each pixel's tile list.

    At pixel centre p, Gaussian g has sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with d = mean - p and
    alpha = min(0.999, opacity exp(-sigma)); it is skipped where sigma < 0 or alpha < 1/255, and
    compositing stops before the first Gaussian that would bring transmittance to <= 1e-4.
    Returns colours [C, H, W, D] (background weighted by the final transmittance) and alphas
    [C, H, W, 1]. With absgrad, backward also sets `means2d.absgrad` [C, N, 2]: the sum over pixels
    of the absolute per-pixel gradient, which gsplat's DefaultStrategy reads.
    """
    C, N, D = colors.shape
    tile_height, tile_width = isect_offsets.shape[1:]
    assert means2d.shape == (C, N, 2) and conics.shape == (C, N, 3) and opacities.shape == (C, N)
    assert isect_offsets.shape[0] == C
    device, n_isects = means2d.device, flatten_ids.numel()

    starts = isect_offsets.flatten().long()  # [T]
    ends = torch.cat([starts[1:], torch.tensor([n_isects], device=device)])
    max_len = int((ends - starts).max().item()) if starts.numel() else 0
    slot = torch.arange(max_len, device=device)
    in_range = slot[None] < (ends - starts)[:, None]  # [T, K]
    ids = flatten_ids.long()[(starts[:, None] + slot[None]).clamp(max=max(n_isects - 1, 0))]
    ids = torch.where(in_range, ids, 0) if n_isects else torch.zeros_like(in_range, dtype=torch.long)

    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    pixel_tile = (ys // tile_size) * tile_width + xs // tile_size  # [H, W]
    tile_of = (torch.arange(C, device=device)[:, None, None] * (tile_width * tile_height) + pixel_tile).flatten()
    pix_ids, pix_valid = ids[tile_of], in_range[tile_of]  # [P, K]

    flat_means = means2d.reshape(C * N, 2)[pix_ids]  # [P, K, 2]
    if absgrad and flat_means.requires_grad:
        flat_means.register_hook(_absgrad_hook(means2d, pix_ids))
    centre = torch.stack([xs, ys], dim=-1).to(means2d.dtype).reshape(1, -1, 2) + 0.5
    delta = flat_means - centre.expand(C, -1, -1).reshape(-1, 1, 2)
    conic = conics.reshape(C * N, 3)[pix_ids]
    sigma = 0.5 * (conic[..., 0] * delta[..., 0] ** 2 + conic[..., 2] * delta[..., 1] ** 2) + conic[
        ..., 1
    ] * delta[..., 0] * delta[..., 1]
    alpha = torch.clamp_max(opacities.reshape(C * N)[pix_ids] * torch.exp(-sigma), ALPHA_MAX)
    used = pix_valid & (sigma >= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(used, alpha, 0.0)
    used = used & (torch.cumprod(1 - alpha.detach(), dim=-1) > T_MIN)
    alpha = torch.where(used, alpha, 0.0)
    transmittance = torch.cumprod(1 - alpha, dim=-1)  # after each Gaussian
    before = torch.cat([torch.ones_like(transmittance[:, :1]), transmittance[:, :-1]], dim=-1)
    weights = alpha * before
    out = torch.einsum("pk,pkd->pd", weights, colors.reshape(C * N, D)[pix_ids])
    final_t = transmittance[:, -1:] if max_len else torch.ones(C * height * width, 1, device=device, dtype=out.dtype)
    if backgrounds is not None:
        out = out + final_t * backgrounds.repeat_interleave(height * width, dim=0)
    return out.reshape(C, height, width, D), (1 - final_t).reshape(C, height, width, 1)


def _absgrad_hook(means2d: Tensor, pix_ids: Tensor):
    """Backward hook that sums |per-pixel gradient| into `means2d.absgrad`."""

    def hook(grad: Tensor) -> None:  # grad: [P, K, 2]
        absgrad = torch.zeros(means2d.shape[0] * means2d.shape[1], 2, dtype=grad.dtype, device=grad.device)
        absgrad.index_add_(0, pix_ids.flatten(), grad.abs().reshape(-1, 2))
        means2d.absgrad = absgrad.reshape(means2d.shape)

    return hook
