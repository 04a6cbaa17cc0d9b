"""splatfacto's photometric loss, (1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM), split into
horizontal bands of tile rows, one band per member, as the reference method splits it.

Each band computes partial sums over the rows it owns, divided by the global counts, so the result
(and its gradient) equals the unbanded loss to float rounding. In training the rendered image (or a
camera batch's C images, stacked to [C * H, W, 3]) is an aggregate over pixel rows (`split_l1_ssim`):
each member sums its own rows, reads the SSIM halo rows from the member below through the exchange
(never across a camera's end), and only partial sums travel. Assembled images use `banded_l1_ssim`,
where every rank computes every band and nothing moves.

SSIM follows pytorch_msssim.SSIM(data_range=1.0, channel=3) exactly: an 11-tap gaussian window (sigma
1.5, built in float32 then cast), "valid" separable convolution, K = (0.01, 0.03). Its map row i reads
input rows [i, i + 10], so a band reads a 10-row halo from the band(s) below it.

Precision by device (`accumulation_dtype`): on the CPU the sums run in float64, so the members' partial
sums round once, like one member's, and `cpu:N` equals `cpu:1` bit for bit. On GPUs they run in the
image's float32: float64 arithmetic is slow there, and gsplat's rasterizer backward adds per-Gaussian
gradients with atomics, so results already differ in the last bits between runs and member counts. The
partials are still combined in member order, so the loss of one image on one member count is the same
on every rank.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, wrap

from ms_splatfacto.backend.aggregate.layout import even_bounds
from ms_splatfacto.backend.ops.row_inputs import RowBands, gt_row_spans, ssim_span

WIN_SIZE = 11
WIN_SIGMA = 1.5
C1 = 0.01**2
C2 = 0.03**2
"""SSIM stabilisers (K1 * data_range)^2 and (K2 * data_range)^2 for data_range 1.0."""


def accumulation_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss sums in for images of `dtype` on `device` (see the module docstring)."""
    return torch.float64 if device.type == "cpu" else dtype


def band_rows(height: int, members: int, tile_size: int) -> List[int]:
    """Pixel-row boundaries [0, ..., height] of `members` contiguous bands of whole tile rows.

    The ceil(height / tile_size) tile rows are dealt out evenly (the first bands take one more when
    uneven), so bands align with the rasterizer's tiles; bands are empty when tile rows run out."""
    assert height >= 0 and members >= 1 and tile_size >= 1, (
        f"need height >= 0, members >= 1, tile_size >= 1, got {height}, {members}, {tile_size}"
    )
    return [min(tiles * tile_size, height) for tiles in even_bounds(-(-height // tile_size), members)]


def gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 1-D window [WIN_SIZE], computed in float32 then cast, as pytorch_msssim does, so that float64
    results agree with it to rounding rather than to float32 precision."""
    coords = torch.arange(WIN_SIZE, dtype=torch.float32) - WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * WIN_SIGMA**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def blur(x: Tensor, win: Tensor, rows: bool, cols: bool) -> Tensor:  # x: [N, C, h, w]
    """Valid separable gaussian blur along rows then columns; an axis is left alone when the image is
    shorter than the window along it (pytorch_msssim skips such an axis, with a warning)."""
    c = x.shape[1]
    if rows:
        x = F.conv2d(x, win.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    if cols:
        x = F.conv2d(x, win.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return x


def ssim_map(x: Tensor, y: Tensor, win: Tensor, rows: bool, cols: bool) -> Tensor:  # x, y: [N, C, h, w]
    """pytorch_msssim's SSIM map ([N, C, h - 10, w - 10] where both axes are blurred). The five blurred
    maps are one grouped convolution over their 5C channels (each channel blurred on its own, as in
    five calls), so a member's band costs two convolutions, not ten."""
    c = x.shape[1]
    mu1, mu2, e_xx, e_yy, e_xy = blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), win, rows, cols).split(c, dim=1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = e_xx - mu1_sq
    sigma2_sq = e_yy - mu2_sq
    sigma12 = e_xy - mu1_mu2
    cs = (2 * sigma12 + C2) / (sigma1_sq + sigma2_sq + C2)
    return (2 * mu1_mu2 + C1) / (mu1_sq + mu2_sq + C1) * cs


def banded_l1_ssim(
    pred: Tensor,  # [H, W, 3] or [C, H, W, 3]
    gt: Tensor,  # same shape as pred
    ssim_lambda: float,
    bands: Sequence[int],  # [members + 1] row boundaries, e.g. from band_rows
) -> Tensor:  # scalar
    """splatfacto's main loss computed band by band: band d sums |gt - pred| over rows
    [bands[d], bands[d+1]) and the SSIM map over the map rows whose first input row it owns, reading a
    halo of the next rows from their owners. For [C, H, W, 3] the result is the mean of the C per-image
    losses (equal to the pooled means, as every image has the same size)."""
    assert pred.shape == gt.shape, f"pred and gt must have the same shape, got {tuple(pred.shape)}, {tuple(gt.shape)}"
    assert pred.dim() in (3, 4) and pred.shape[-1] == 3, f"images must be [H, W, 3] or [C, H, W, 3], got {tuple(pred.shape)}"
    assert pred.dtype == gt.dtype and pred.is_floating_point(), (
        f"pred and gt must share a floating dtype, got {pred.dtype} and {gt.dtype}"
    )
    pred4, gt4 = (pred, gt) if pred.dim() == 4 else (pred[None], gt[None])
    n, h, w, _ = pred4.shape
    assert n > 0 and h > 0 and w > 0, f"images must not be empty, got {tuple(pred.shape)}"
    bands = [int(b) for b in bands]
    assert len(bands) >= 2 and bands[0] == 0 and bands[-1] == h and all(a <= b for a, b in zip(bands, bands[1:])), (
        f"bands must be non-decreasing row boundaries from 0 to H={h}, got {bands}"
    )
    rows, cols = h >= WIN_SIZE, w >= WIN_SIZE
    halo = WIN_SIZE - 1 if rows else 0
    map_h, map_w = h - halo, w - (WIN_SIZE - 1 if cols else 0)
    win = gaussian_window(pred.dtype, pred.device)
    members = len(bands) - 1
    l1_sums, ssim_sums = [], []
    for d in range(members):
        lo, hi = bands[d], bands[d + 1]
        if lo == hi:
            continue
        l1_sums.append((gt4[:, lo:hi] - pred4[:, lo:hi]).abs().sum())
        end = min(hi, map_h)
        if end > lo:
            x = gt4[:, lo : end + halo].permute(0, 3, 1, 2)
            y = pred4[:, lo : end + halo].permute(0, 3, 1, 2)
            ssim_sums.append(ssim_map(x, y, win, rows, cols).sum())
    l1 = torch.stack(l1_sums).sum() / (n * h * w * 3)
    ssim = torch.stack(ssim_sums).sum() / (n * 3 * map_h * map_w)
    return (1 - ssim_lambda) * l1 + ssim_lambda * (1 - ssim)


def split_l1_ssim(
    pred: AggregateTensor,  # [C * H, W, 3], rows striped over the members that rendered them
    gt: Union[Tensor, RowBands],  # [C * H, W, 3] ordinary (each member reads its rows), or each member's band
    ssim_lambda: float,
    image_height: Optional[int] = None,  # H, when the rows are a camera batch's C stacked images
) -> Tensor:  # scalar, the same on every rank
    """`banded_l1_ssim` where the pixels are: each member's band is its rows of `pred`; it sums |gt -
    pred| over them and the SSIM map over the map rows starting in them, reading the 10 halo rows below
    from their owners through the exchange. Only the partial sums travel (to every rank); in backward
    each member hands the halo rows' gradients back to their owners. The ground truth is either whole
    or already where it is needed (`RowBands` over `gt_row_spans`, from `row_inputs.read_bands`).
    For C stacked images no SSIM window crosses an image's end, and the result is the mean of the C
    images' losses, as `banded_l1_ssim` gives for [C, H, W, 3]."""
    rows_total, w = pred.shape[0], pred.shape[1]
    h = rows_total if image_height is None else int(image_height)
    assert tuple(pred.shape) == tuple(gt.shape) and pred.dim() == 3 and pred.shape[-1] == 3, (
        f"pred and gt must be [C * H, W, 3], got {tuple(pred.shape)}, {tuple(gt.shape)}"
    )
    assert h > 0 and w > 0 and rows_total % h == 0, f"images must not be empty, and {rows_total} rows must stack images of {h}, got {tuple(pred.shape)}"
    if isinstance(gt, RowBands):
        assert gt.layout.bounds == pred._layout.bounds and gt.spans == gt_row_spans(gt.layout.bounds, rows_total, h), (
            f"the ground-truth bands must cover each member's rows and SSIM halo, got spans {gt.spans}"
        )
    assert pred.dtype == gt.dtype and pred.is_floating_point(), f"pred and gt must share a floating dtype, got {pred.dtype}, {gt.dtype}"
    n = rows_total // h
    rows, cols = h >= WIN_SIZE, w >= WIN_SIZE
    map_h, map_w = h - (WIN_SIZE - 1 if rows else 0), w - (WIN_SIZE - 1 if cols else 0)
    l1_sum, ssim_sum = _SplitSums.apply(gt, rows, cols, h, pred)
    l1 = l1_sum / (n * h * w * 3)
    ssim = ssim_sum / (n * 3 * map_h * map_w)
    return (1 - ssim_lambda) * l1 + ssim_lambda * (1 - ssim)


def _image_pieces(lo: int, stop: int, image_height: int, halo: int) -> List[tuple]:
    """[a, b) pieces of rows [lo, stop) cut at the images' ends that hold at least one SSIM window."""
    pieces = []
    for image in range(lo // image_height, (stop - 1) // image_height + 1 if stop > lo else lo // image_height):
        a, b = max(lo, image * image_height), min(stop, (image + 1) * image_height)
        if b - a > halo:
            pieces.append((a, b))
    return pieces


class _SplitSums(torch.autograd.Function):
    """(sum of |gt - pred|, sum of the SSIM map), each the sum of the members' partials in member order."""

    @staticmethod
    def forward(ctx, gt: Tensor, rows: bool, cols: bool, image_height: int, pred: AggregateTensor):
        layout = pred._layout
        m = layout.members
        halo = WIN_SIZE - 1 if rows else 0
        bands = layout.bounds
        starts = [ssim_span(bands[d], bands[d + 1], image_height)[0] for d in range(len(m))]
        # the halo rows below each band, for the map rows starting in it (every rank knows every band)
        wanted = [(bands[d + 1], ssim_span(bands[d], bands[d + 1], image_height)[1]) for d in range(len(m))]
        halos = exchange.request_row_ranges(m, wanted, layout, pred.chunks)
        win = gaussian_window(pred.dtype, m.device)
        ctx.graphs, ctx.layout, ctx.wanted = [], layout, wanted
        l1_parts, ssim_parts = {}, {}
        for r in m.local:
            lo, hi = bands[r], bands[r + 1]
            own = pred.chunks[r].detach().requires_grad_(True)
            below = halos[r].detach().requires_grad_(True)
            if isinstance(gt, RowBands):  # already on the member: its rows, then its halo rows
                x = gt.band(r)[: hi - lo + below.shape[0]][None]
            else:
                x = exchange.to_member(gt[lo : hi + below.shape[0]], r, layout)[None]
            with torch.enable_grad():
                l1 = (x[:, : hi - lo] - own[None]).abs().sum() if hi > lo else own.sum() * 0
                if starts[r]:  # one SSIM map per image the rows cross: no window spans two images
                    y = torch.cat([own, below])[None]
                    pieces = _image_pieces(lo, hi + below.shape[0], image_height, halo)
                    ssim = torch.stack([
                        ssim_map(x[:, a - lo : b - lo].permute(0, 3, 1, 2), y[:, a - lo : b - lo].permute(0, 3, 1, 2),
                                 win.to(own.device), rows, cols).sum()
                        for a, b in pieces
                    ]).sum()
                else:
                    ssim = own.sum() * 0
            ctx.graphs.append((r, own, below, l1, ssim))
            l1_parts[r], ssim_parts[r] = l1.detach()[None], ssim.detach()[None]
        holders = [d for d in range(len(m)) if bands[d + 1] > bands[d]]
        starts_map = [d for d in holders if starts[d]]
        l1_all = exchange.replicate(m, {r: l1_parts[r][: int(r in holders)] for r in m.local},
                                    rows_per_member=[int(d in holders) for d in range(len(m))])
        ssim_all = exchange.replicate(m, {r: ssim_parts[r][: int(r in starts_map)] for r in m.local},
                                      rows_per_member=[int(d in starts_map) for d in range(len(m))])
        l1_sum = torch.cat([l1_all[d] for d in holders]).sum()
        ssim_sum = torch.cat([ssim_all[d] for d in starts_map]).sum()
        return l1_sum, ssim_sum

    @staticmethod
    def backward(ctx, g_l1: Tensor, g_ssim: Tensor):
        layout = ctx.layout
        m = layout.members
        n = len(m)
        grads, back = {}, {}
        for r, own, below, l1, ssim in ctx.graphs:
            g_own, g_below = torch.autograd.grad([l1, ssim], [own, below], [g_l1.to(own.device), g_ssim.to(own.device)], allow_unused=True)
            grads[r] = torch.zeros_like(own) if g_own is None else g_own
            g_below = torch.zeros_like(below) if g_below is None else g_below
            lo, hi = ctx.wanted[r]
            edges = layout.bounds
            back[r] = [g_below[min(max(lo, edges[s]), hi) - lo : max(min(hi, edges[s + 1]), lo) - lo] for s in range(n)]
        ctx.graphs = []
        got = exchange.all_to_all(m, back)
        for s in m.local:
            for r in range(n):  # halo gradients from the members above, in member order
                piece = got[s][r]
                if piece.shape[0]:
                    grads[s][: piece.shape[0]] += piece.to(grads[s].device)
        pred_grad = wrap(layout, chunks=[grads.get(d) for d in range(n)])
        return None, None, None, None, pred_grad
