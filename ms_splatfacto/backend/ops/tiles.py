"""Tile intersection split by key range, and rasterization split by tile range.

The camera-major list of (camera, tile) keys is cut into contiguous, even ranges, one per member.
Each Gaussian's owner intersects its Gaussians with the tiles (the unchanged kernel on its chunk) and
routes each intersection to the member whose range holds the key; that member sorts what it receives
(sources arrive in global row order, each already sorted, so a stable sort of the concatenation gives
exactly the single-device order, and the members' lists concatenated are globally sorted: no merge).

Rasterization: member r renders the tiles of its key range. It reads the projected records
(means2d, conic, colour, opacity of one Gaussian in one camera) its intersections name from their
owners: a remote read, counted once per record and member. In backward, member r accumulates the
gradients of the records it read into its own buffer and hands each owner its part: a (sparse)
reduce-scatter, counted the same way. Pixels travel to member 0, which holds the assembled image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout, even_bounds
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, wrap


@dataclass
class SourceRecords:
    """The records member r reads from source member s."""

    source: int
    start: int  # its records are r's records [start, stop): grouped by owner, as rows are
    stop: int
    flat: Tensor  # [stop - start] long: (row local to s's chunk) * C + camera, into the chunk's records


@dataclass
class MemberTiles:
    """Member r's share of the rendering: cameras [cam_lo, cam_hi], its sorted intersections and the
    records they name."""

    cam_lo: int
    cam_hi: int
    isect_ids: Tensor  # [M_r] int64, sorted: (camera, tile, depth) keys of the member's range
    offsets: Tensor  # [C_r, tile_height, tile_width] int32, into flatten_ids
    flatten_ids: Tensor  # [M_r] int32, into the member's records
    records: Tensor  # [n_records] int64: global row * C + camera of each record, sorted
    n_records: int
    sources: List[SourceRecords]
    pixels: Tensor  # [C_r, H, W, 1] bool: the pixels of its tiles
    n_pixels: int

    @property
    def n_cameras(self) -> int:
        return self.cam_hi - self.cam_lo + 1

    @property
    def padded(self) -> int:
        """Records per camera row of the [C_r, P] arrays the kernel takes (it indexes them flat)."""
        return max(1, math.ceil(self.n_records / self.n_cameras))


@dataclass
class TilePlan:
    """Who renders which tiles and reads which records, for one set of cameras."""

    layout: Layout  # of the Gaussians
    n_cameras: int
    width: int
    height: int
    tile_size: int
    tile_width: int
    tile_height: int
    tile_bounds: List[int]  # [members + 1] in camera-major tile order
    work: List[Optional[MemberTiles]]  # None for members without tiles
    n_isects: int

    def remote_page_bytes(self, record_bytes: List[int], page_bytes: int = 4096) -> int:
        """Remote reads at page granularity: the bytes of every page of another member's record arrays
        (one per field, `record_bytes` per (row, camera) record) that a member reads from. What moves
        where managed memory migrates pages rather than serving cache lines; the Morton order makes a
        member's reads land on fewer pages."""
        total = 0
        for r, work in enumerate(self.work):
            for src in work.sources if work is not None else ():
                if src.source != r:
                    total += sum(torch.unique(src.flat * rb // page_bytes).numel() for rb in record_bytes) * page_bytes
        return total


def plan_tiles(
    kernels: ModuleType,
    means2d: AggregateTensor,  # [N, C, 2]
    radii: AggregateTensor,  # [N, C] int32
    depths: AggregateTensor,  # [N, C]
    width: int,
    height: int,
    tile_size: int,
) -> TilePlan:
    """Intersect every member's Gaussians with the tiles and route the intersections to the members
    owning their key ranges (counted as "other" traffic: 12 B per routed intersection)."""
    N, C = radii.shape
    assert means2d.shape == (N, C, 2) and depths.shape == (N, C), "projected records must be Gaussian-major [N, C, ...]"
    layout = radii._layout
    n_members = len(layout.members)
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    per_camera = tile_width * tile_height
    tile_bits = per_camera.bit_length()
    tile_bounds = even_bounds(C * per_camera, n_members)
    edges = torch.tensor(tile_bounds[1:-1], dtype=torch.long, device=layout.members.device)
    routed: List[List[Tuple[Tensor, Tensor]]] = [[] for _ in range(n_members)]
    for s in range(n_members):
        n_s = layout.counts[s]
        if n_s == 0 or C == 0:
            continue
        _, ids, flat = kernels.isect_tiles(
            means2d.chunks[s].transpose(0, 1).contiguous(), radii.chunks[s].t().contiguous(),
            depths.chunks[s].t().contiguous(), tile_size, tile_width, tile_height,
        )
        key = ids >> 32
        global_tile = (key >> tile_bits) * per_camera + (key & ((1 << tile_bits) - 1))
        flat = flat.long()
        record = (layout.bounds[s] + flat % n_s) * C + flat // n_s  # global row * C + camera
        dest = torch.bucketize(global_tile, edges.to(ids.device), right=True)
        for r, count in enumerate(torch.bincount(dest, minlength=n_members).tolist()):
            if count:
                sel = dest == r
                exchange.record(s, r, count * (ids.element_size() + 4))
                routed[r].append((exchange.to_member(ids[sel], r, layout), exchange.to_member(record[sel], r, layout)))
    pixel_owner = _pixel_owners(edges, C, width, height, tile_size, tile_width, tile_height)
    work = [
        _member_tiles(kernels, r, routed[r], tile_bounds, layout, C, tile_width, tile_height, tile_bits, pixel_owner)
        for r in range(n_members)
    ]
    return TilePlan(
        layout, C, width, height, tile_size, tile_width, tile_height, tile_bounds, work,
        sum(ids.shape[0] for lists in routed for ids, _ in lists),
    )


def _pixel_owners(
    edges: Tensor, C: int, width: int, height: int, tile_size: int, tile_width: int, tile_height: int
) -> Tensor:
    """[C, H, W] member rendering each pixel (`edges`: the members' first camera-major tiles but 0's)."""
    device = edges.device
    ty = torch.arange(height, device=device) // tile_size
    tx = torch.arange(width, device=device) // tile_size
    tile = (torch.arange(C, device=device)[:, None, None] * tile_height + ty[None, :, None]) * tile_width + tx[None, None, :]
    return torch.bucketize(tile, edges, right=True)


def _member_tiles(
    kernels: ModuleType,
    r: int,
    routed: List[Tuple[Tensor, Tensor]],
    tile_bounds: List[int],
    layout: Layout,
    C: int,
    tile_width: int,
    tile_height: int,
    tile_bits: int,
    pixel_owner: Tensor,  # [C, H, W]
) -> Optional[MemberTiles]:
    if tile_bounds[r + 1] == tile_bounds[r]:
        return None
    per_camera = tile_width * tile_height
    cam_lo, cam_hi = tile_bounds[r] // per_camera, (tile_bounds[r + 1] - 1) // per_camera
    device = layout.members.devices[r]
    if routed:
        ids = torch.cat([i for i, _ in routed])
        records = torch.cat([rec for _, rec in routed])
        ids, order = torch.sort(ids, stable=True)
        records = records[order]
    else:
        ids = torch.zeros(0, dtype=torch.long, device=device)
        records = torch.zeros(0, dtype=torch.long, device=device)
    unique, flatten_ids = torch.unique(records, return_inverse=True)
    offsets = kernels.isect_offset_encode(ids - (cam_lo << (32 + tile_bits)), cam_hi - cam_lo + 1, tile_width, tile_height)
    firsts = torch.tensor([b * C for b in layout.bounds], dtype=unique.dtype, device=unique.device)
    cuts = torch.searchsorted(unique, firsts).tolist()
    sources = [
        SourceRecords(s, cuts[s], cuts[s + 1], unique[cuts[s] : cuts[s + 1]] - layout.bounds[s] * C)
        for s in range(len(layout.members))
        if cuts[s + 1] > cuts[s]
    ]
    pixels = pixel_owner[cam_lo : cam_hi + 1, ..., None] == r
    return MemberTiles(
        cam_lo, cam_hi, ids, offsets, flatten_ids.int(), unique, unique.shape[0], sources, pixels, int(pixels.sum())
    )


def _read_records(work: MemberTiles, fields: Tuple[AggregateTensor, ...], r: int, layout: Layout) -> List[Tensor]:
    """The member's records of each field ([N, C, ...] aggregates) as [C_r, P, ...] arrays, read from
    their owners (remote reads for records another member holds). Records are grouped by owner, so
    each field is one concatenation of per-owner reads, zero-padded to C_r * P."""
    padded = work.padded * work.n_cameras
    out = []
    for field in fields:
        tail = field.shape[2:]
        pieces = [
            exchange.to_member(field.chunks[src.source].reshape(-1, *tail).index_select(0, src.flat), r, layout)
            for src in work.sources
        ]
        pieces.append(torch.zeros((padded - work.n_records, *tail), dtype=field.dtype, device=layout.members.devices[r]))
        out.append(torch.cat(pieces).reshape(work.n_cameras, work.padded, *tail))
    per_record = sum(math.prod(f.shape[2:]) * f.element_size() for f in fields)
    for src in work.sources:
        exchange.record(src.source, r, (src.stop - src.start) * per_record, kind="remote_read")
    return out


class _TileRasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: TilePlan, kernels: ModuleType, backgrounds: Optional[Tensor], absgrad: bool, track: bool,
                means2d, conics, colors, opacities):
        layout = plan.layout
        fields = (means2d, conics, colors, opacities)
        C, D = plan.n_cameras, colors.shape[2]
        device = layout.members.device
        render = torch.zeros((C, plan.height, plan.width, D), dtype=colors.dtype, device=device)
        alphas = torch.zeros((C, plan.height, plan.width, 1), dtype=colors.dtype, device=device)
        ctx.graphs = []
        for r, work in enumerate(plan.work):
            if work is None:
                continue
            records = [t.requires_grad_(track) for t in _read_records(work, fields, r, layout)]
            bg = None if backgrounds is None else backgrounds[work.cam_lo : work.cam_hi + 1]
            with torch.set_grad_enabled(track):
                colors_r, alphas_r = kernels.rasterize_to_pixels(
                    *records, plan.width, plan.height, plan.tile_size, work.offsets, work.flatten_ids,
                    backgrounds=bg, absgrad=absgrad, float64_sums=True,
                )
            cams = slice(work.cam_lo, work.cam_hi + 1)
            mask = exchange.to_member(work.pixels, 0, layout)
            render[cams] = torch.where(mask, exchange.to_member(colors_r, 0, layout), render[cams])
            alphas[cams] = torch.where(mask, exchange.to_member(alphas_r, 0, layout), alphas[cams])
            exchange.record(r, 0, work.n_pixels * (D + 1) * colors.element_size())
            if track:
                ctx.graphs.append((r, records, colors_r, alphas_r))
        ctx.plan, ctx.absgrad, ctx.means2d = plan, absgrad, means2d
        ctx.row_shapes = [tuple(f.shape[1:]) for f in fields] + [tuple(means2d.shape[1:])]
        ctx.dtype = colors.dtype
        return render, alphas

    @staticmethod
    def backward(ctx, v_render: Tensor, v_alphas: Tensor):  # [C, H, W, D], [C, H, W, 1]
        plan: TilePlan = ctx.plan
        layout = plan.layout
        n_fields = 5 if ctx.absgrad else 4  # means2d, conics, colors, opacities (, means2d absgrad)
        owned: List[List[Optional[Tensor]]] = [[None] * len(layout.members) for _ in range(n_fields)]
        for r, records, colors_r, alphas_r in ctx.graphs:
            work = plan.work[r]
            cams = slice(work.cam_lo, work.cam_hi + 1)
            g_render = exchange.to_member(v_render[cams], r, layout) * work.pixels
            g_alpha = exchange.to_member(v_alphas[cams], r, layout) * work.pixels
            exchange.record(0, r, work.n_pixels * (v_render.shape[-1] + 1) * v_render.element_size())
            pairs = [(o, g) for o, g in ((colors_r, g_render), (alphas_r, g_alpha)) if o.requires_grad]
            found = list(
                torch.autograd.grad([o for o, _ in pairs], records, [g for _, g in pairs], allow_unused=True)
                if pairs else [None] * len(records)
            )
            if ctx.absgrad:
                found.append(getattr(records[0], "absgrad", None))
            exact = getattr(records[0], "float64_sums", None)  # kernel sets that keep unrounded sums
            if exact is not None:
                found = [exact[k] for k in ("means2d", "conics", "colors", "opacities", "absgrad")[: len(found)]]
            _reduce_scatter(work, r, found, owned, ctx.row_shapes, layout, ctx.dtype)
        ctx.graphs = []
        out = [
            wrap(layout, chunks=[
                g.reshape(layout.counts[d], *ctx.row_shapes[i]).to(ctx.dtype) if g is not None
                else torch.zeros((layout.counts[d], *ctx.row_shapes[i]), dtype=ctx.dtype, device=layout.members.devices[d])
                for d, g in enumerate(owned[i])
            ])
            for i in range(n_fields)
        ]
        if ctx.absgrad:
            ctx.means2d.absgrad = out[4]
        ctx.means2d = None
        return (None, None, None, None, None, *out[:4])


def _reduce_scatter(
    work: MemberTiles, r: int, found: List[Optional[Tensor]], owned, row_shapes, layout: Layout, dtype: torch.dtype
) -> None:
    """Hand each owner the gradients of its records that member r accumulated (added into the owner's
    [rows * C, ...] buffer, made on first use, in the partials' dtype: float64 where the kernel set
    gives unrounded sums, so the owner's total rounds like the single-device one); counted per record
    that crosses members, at the model's dtype."""
    per_record = 0
    for i, g in enumerate(found):
        if g is None:
            continue
        flat = g.reshape(-1, *row_shapes[i][1:])
        per_record += math.prod(row_shapes[i][1:]) * dtype.itemsize
        for src in work.sources:
            s = src.source
            if owned[i][s] is None:
                rows = layout.counts[s] * row_shapes[i][0]
                owned[i][s] = torch.zeros((rows, *row_shapes[i][1:]), dtype=g.dtype, device=layout.members.devices[s])
            values = exchange.to_member(flat[src.start : src.stop], s, layout)
            owned[i][s].index_add_(0, src.flat.to(values.device), values)
    for src in work.sources:
        exchange.record(r, src.source, (src.stop - src.start) * per_record, kind="reduce_scatter")


def tile_rasterize(
    plan: TilePlan,
    kernels: ModuleType,
    means2d: AggregateTensor,  # [N, C, 2]
    conics: AggregateTensor,  # [N, C, 3]
    colors: AggregateTensor,  # [N, C, D]
    opacities: AggregateTensor,  # [N, C]
    backgrounds: Optional[Tensor] = None,  # [C, D], not differentiated
    absgrad: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Render the plan's cameras: colours [C, H, W, D] and alphas [C, H, W, 1], ordinary tensors on
    member 0. Backward gives aggregate gradients for the four record fields and, with `absgrad`, sets
    `means2d.absgrad` ([N, C, 2] aggregate) as gsplat's kernels do."""
    N, C = opacities.shape
    D = colors.shape[2]
    assert means2d.shape == (N, C, 2) and conics.shape == (N, C, 3) and colors.shape == (N, C, D), "records must be [N, C, ...]"
    assert backgrounds is None or backgrounds.shape == (C, D), f"backgrounds must be [{C}, {D}]"
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, colors, opacities))
    return _TileRasterize.apply(plan, kernels, backgrounds, absgrad, track, means2d, conics, colors, opacities)
