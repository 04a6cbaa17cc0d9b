"""Rasterization split by tile range, on a `TilePlan` (tiles.py).

Member r renders the tiles of its key range. It reads the projected records (means2d, conic, colour,
opacity of one Gaussian in one camera) its intersections name from their owners: the plan tells each
owner which of its records r reads, and every render moves them in one exchange (a remote read,
counted once per record and member). In backward, member r accumulates the gradients of the records it
read into its own buffer and hands each owner its part: a (sparse) reduce-scatter, in float64 where the
kernels keep unrounded sums. Each member sends the pixels of its tiles to every rank, which assembles
the image as an ordinary (replicated) tensor; the gradient of the image is then on every rank, and each
member takes its own pixels of it without any transfer.

Every step is SPMD: a rank works for its own members only, and all data for another member goes
through the exchange.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.redistribute import relayout
from ms_splatfacto.backend.aggregate.streams import member_streams
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, LocalRows, is_aggregate
from ms_splatfacto.backend.ops.tiles import SourceRecords, TilePlan


def _own_and_runs(sources: List[SourceRecords], r: int) -> Tuple[Optional[SourceRecords], List[List[SourceRecords]]]:
    """Member r's reads of its own records, and its reads from other owners as runs of consecutive rows:
    records are grouped by owner, so the owners before r's own records are one run and those after it
    another (either may be empty)."""
    own = next((src for src in sources if src.source == r), None)
    remote = [src for src in sources if src.source != r]
    if own is None:
        return None, [remote, []]
    return own, [[b for b in remote if b.stop <= own.start], [b for b in remote if b.start >= own.stop]]


def _read_records(plan: TilePlan, fields: Tuple[AggregateTensor, ...]) -> Dict[int, List[Tensor]]:
    """Each local member's records of each field ([N, C, ...] aggregates) as [C_r, P, ...] arrays, read
    from their owners in one exchange (remote reads for records another member holds; a member's own
    records are selected in place). An owner that others read puts its fields side by side once
    ([rows * C, sum of widths], a forward transient well under the backward's peak) so each reader
    costs it one gather. Records are grouped by owner, so the owners before and after a member's own
    records are one run of rows each: every field is written once per run, zero-padded to C_r * P."""
    layout = plan.layout
    m = layout.members
    widths = [math.prod(f.shape[2:]) for f in fields]
    flat = {s: [f.chunks[s].reshape(-1, w) for f, w in zip(fields, widths)] for s in m.local}  # local owners' [rows * C, w] views
    send = {}
    for s in m.local:
        readers = [r for r in range(len(m)) if r != s and plan.serve[s][r].shape[0]]
        none = torch.zeros((0, sum(widths)), dtype=fields[0].dtype, device=m.devices[s])
        packed = torch.cat(flat[s], dim=1) if readers else None  # [rows * C, sum(widths)]: one gather per reader
        send[s] = [packed.index_select(0, plan.serve[s][r].to(packed.device)) if r in readers else none for r in range(len(m))]
        del packed
    got = exchange.all_to_all(m, send, kind="remote_read")
    out = {}
    for r in m.local:
        work = plan.work[r]
        if work is None:
            continue
        padded = work.padded * work.n_cameras
        arrays = [torch.empty((padded, w), dtype=f.dtype, device=m.devices[r]) for f, w in zip(fields, widths)]
        own, runs = _own_and_runs(work.sources, r)
        if own is not None:  # its own records: selected straight into the arrays
            index = plan.serve[r][r].to(m.devices[r])
            for array, x in zip(arrays, flat[r]):
                torch.index_select(x, 0, index, out=array[own.start : own.stop])
        for block in runs:
            if block:  # the owners before (then after) its own records: one contiguous run of rows each
                pieces = [got[r][src.source] for src in block]
                received = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                for array, piece in zip(arrays, torch.split(received.to(m.devices[r]), widths, dim=1)):
                    array[block[0].start : block[-1].stop] = piece
        for array in arrays:
            array[work.n_records :].zero_()
        out[r] = [a.view(work.n_cameras, work.padded, *f.shape[2:]) for a, f in zip(arrays, fields)]
    return out


def _own_rows(plan: TilePlan, images: Dict[int, Tensor], channels: int, dtype: torch.dtype) -> Dict[int, Tensor]:
    """Each local member's pixel rows ([rows, W, channels] views of the frames it rendered; empty for
    members without tiles)."""
    m = plan.layout.members
    bounds = plan.pixel_row_bounds()
    rows = {}
    for r in m.local:
        work = plan.work[r]
        if work is None:
            rows[r] = torch.zeros((0, plan.width, channels), dtype=dtype, device=m.devices[r])
            continue
        first = work.cam_lo * plan.height
        rows[r] = images[r].reshape(-1, plan.width, channels)[bounds[r] - first : bounds[r + 1] - first]
    return rows


def _assemble(plan: TilePlan, images: Dict[int, Tensor], channels: int, dtype: torch.dtype, device) -> Tensor:
    """The [C, H, W, channels] image on every rank: each member sends its pixel rows to every rank."""
    m = plan.layout.members
    bounds = plan.pixel_row_bounds()
    parts = _own_rows(plan, images, channels, dtype)
    got = exchange.replicate(m, parts, rows_per_member=[b - a for a, b in zip(bounds, bounds[1:])])
    return torch.cat([rows.to(device) for rows in got]).view(plan.n_cameras, plan.height, plan.width, channels)


def _split(plan: TilePlan, images: Dict[int, Tensor], channels: int, dtype: torch.dtype) -> AggregateTensor:
    """The [C * H, W, channels] image as an aggregate over pixel rows: each member keeps the rows of
    its tiles, nothing moves."""
    m = plan.layout.members
    own = _own_rows(plan, images, channels, dtype)
    rows = LocalRows(Layout(tuple(plan.pixel_row_bounds()), m))
    for r in m.local:
        rows.put(r, own[r])
    return rows.result()


def _member_rows(plan: TilePlan, v: Tensor, r: int) -> Tensor:
    """Local member r's share of an image gradient ([C, H, W, K] ordinary, or [C * H, W, K] aggregate over
    pixel rows) as its [C_r, H, W, K] frames, zero outside its pixel rows: ordinary ones are on every
    rank (masked to its pixels); aggregate ones are in the image's layout, so r's rows are its own."""
    work = plan.work[r]
    layout = plan.layout
    if not is_aggregate(v):  # autograd hands an unused split output an ordinary [C * H, W, K] zero gradient
        v = v.reshape(plan.n_cameras, plan.height, plan.width, v.shape[-1])
        mine = (plan.pixel_owner[work.cam_lo : work.cam_hi + 1, ..., None] == r).to(layout.members.devices[r])  # [C_r, H, W, 1]
        return exchange.to_member(v[work.cam_lo : work.cam_hi + 1], r, layout) * mine
    bounds = plan.pixel_row_bounds()
    frames = torch.zeros((work.n_cameras * plan.height, plan.width, v.shape[-1]), dtype=v.dtype, device=layout.members.devices[r])
    first = work.cam_lo * plan.height
    frames[bounds[r] - first : bounds[r + 1] - first] = v.chunks[r]
    return frames.view(work.n_cameras, plan.height, plan.width, v.shape[-1])


class _TileRasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: TilePlan, kernels: ModuleType, backgrounds: Optional[Tensor], absgrad: bool, track: bool,
                split: bool, means2d, conics, colors, opacities):
        layout = plan.layout
        m = layout.members
        fields = (means2d, conics, colors, opacities)
        D = colors.shape[2]
        records = _read_records(plan, fields)
        direct = hasattr(kernels, "rasterize_to_pixels_direct") and getattr(kernels, "KEEPS_FLOAT64_SUMS", False)
        ctx.graphs, ctx.direct = [], direct
        images = {}
        streams = member_streams(m)
        for r in m.local:
            work = plan.work[r]
            if work is None:
                continue
            bg = None if backgrounds is None else exchange.to_member(backgrounds[work.cam_lo : work.cam_hi + 1], r, layout)
            if direct:  # the kernel set runs its backward itself: no autograd graph per member
                with streams.run(r):
                    colors_r, alphas_r, saved = kernels.rasterize_to_pixels_direct(
                        *records[r], plan.width, plan.height, plan.tile_size, work.offsets, work.flatten_ids, backgrounds=bg,
                    )
                if track:
                    ctx.graphs.append((r, saved))
            else:
                mine = [t.requires_grad_(track) for t in records[r]]
                sums: Dict[str, Optional[Tensor]] = {}
                with torch.set_grad_enabled(track), streams.run(r):
                    colors_r, alphas_r = kernels.rasterize_to_pixels(
                        *mine, plan.width, plan.height, plan.tile_size, work.offsets, work.flatten_ids,
                        backgrounds=bg, absgrad=absgrad, float64_sums=sums,
                    )
                if track:
                    ctx.graphs.append((r, (mine, colors_r, alphas_r, sums)))
            images[r] = (colors_r.detach(), alphas_r.detach())
        streams.join()
        ctx.plan, ctx.absgrad, ctx.means2d, ctx.kernels = plan, absgrad, means2d, kernels
        ctx.row_shapes = [tuple(f.shape[1:]) for f in fields] + [tuple(means2d.shape[1:])]
        ctx.dtype = colors.dtype
        if split:
            return (_split(plan, {r: c for r, (c, _) in images.items()}, D, colors.dtype),
                    _split(plan, {r: a for r, (_, a) in images.items()}, 1, colors.dtype))
        both = _assemble(plan, {r: torch.cat(pair, dim=-1) for r, pair in images.items()}, D + 1, colors.dtype, m.device)
        return both[..., :D].contiguous(), both[..., D:].contiguous()

    @staticmethod
    def backward(ctx, v_render: Tensor, v_alphas: Tensor):  # [C, H, W, D], [C, H, W, 1] or [C * H, W, ...] aggregates
        plan: TilePlan = ctx.plan
        layout = plan.layout
        m = layout.members
        image_layout = Layout(tuple(plan.pixel_row_bounds()), m)
        v_render, v_alphas = (relayout(v, image_layout) if is_aggregate(v) else v for v in (v_render, v_alphas))
        n_fields = 5 if ctx.absgrad else 4  # means2d, conics, colors, opacities (, means2d absgrad)
        partials: Dict[int, List[Optional[Tensor]]] = {}
        streams = member_streams(m)
        for r, graph in ctx.graphs:
            work = plan.work[r]
            g_render = _member_rows(plan, v_render, r)
            g_alpha = _member_rows(plan, v_alphas, r)
            if not is_aggregate(v_render):  # read from the rank's copy of the image gradient
                exchange.record(m.host, r, work.n_pixels * (v_render.shape[-1] + 1) * v_render.element_size())
            with streams.run(r):
                partials[r] = (_direct_partials if ctx.direct else _autograd_partials)(ctx, graph, g_render, g_alpha, n_fields)
            del graph
        ctx.graphs = []
        streams.join()
        wide = torch.float64 if getattr(ctx.kernels, "KEEPS_FLOAT64_SUMS", False) else ctx.dtype
        out = _reduce_scatter(plan, partials, ctx.row_shapes[:n_fields], wide, ctx.dtype)
        plan.release_render_tensors()
        if ctx.absgrad:
            ctx.means2d.absgrad = out[4]
        ctx.means2d = None
        return (None, None, None, None, None, None, *out[:4])


FIELDS = ("means2d", "conics", "colors", "opacities", "absgrad")


def _direct_partials(ctx, saved, g_render: Tensor, g_alpha: Tensor, n_fields: int) -> List[Optional[Tensor]]:
    """A member's record gradients (unrounded sums) from the kernel set's own backward."""
    sums = ctx.kernels.rasterize_to_pixels_direct_backward(saved, g_render, g_alpha, absgrad=ctx.absgrad)
    return [sums[k] for k in FIELDS[:n_fields]]


def _autograd_partials(ctx, graph, g_render: Tensor, g_alpha: Tensor, n_fields: int) -> List[Optional[Tensor]]:
    """A member's record gradients through its autograd graph (kernel sets without a direct backward;
    the unrounded sums where the kernel set fills them)."""
    records, colors_r, alphas_r, sums = graph
    pairs = [(o, g) for o, g in ((colors_r, g_render), (alphas_r, g_alpha)) if o.requires_grad]
    found = list(torch.autograd.grad([o for o, _ in pairs], records, [g for _, g in pairs], allow_unused=True)
                 if pairs else [None] * len(records))
    if ctx.absgrad:
        found.append(getattr(records[0], "absgrad", None))
    if sums:  # kernel sets that keep unrounded sums filled the dict in their backward
        found = [sums[k] for k in FIELDS[: len(found)]]
        sums.clear()  # the partials alone hold them now: each is freed once its field is reduced
    return found


GROUP_BYTES = 16 << 20
"""Largest float64 reduction buffer for several fields at once: fields share one [rows * C, widths]
buffer (one zero fill and one add per sender) while it stays under this, else each field has its own,
so at scale the peak holds one field's buffer, as before."""


def _field_groups(widths: List[int], rows: int, itemsize: int) -> List[List[int]]:
    """Consecutive fields grouped so each group's [rows, sum of widths] buffer fits GROUP_BYTES (a field
    wider than that alone)."""
    groups: List[List[int]] = []
    for i, w in enumerate(widths):
        if groups and rows * itemsize * (w + sum(widths[j] for j in groups[-1])) <= GROUP_BYTES:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _reduce_scatter(
    plan: TilePlan, partials: Dict[int, List[Optional[Tensor]]], row_shapes, wide: torch.dtype, dtype: torch.dtype
) -> List[AggregateTensor]:
    """Hand each owner the gradients of its records that each member accumulated: every member sends
    each other owner its records' gradients of all fields side by side (in `wide`: float64 where the
    kernel set gives unrounded sums, so the owner's total rounds like the single-device one) in one
    exchange; a member's own records stay where they are. Each owner adds them into [rows * C, w]
    buffers in member order, for a group of fields at once where small (`GROUP_BYTES`), and rounds each
    field to `dtype` before the next group's buffer exists. Returns one [N, C, ...] aggregate gradient
    per field."""
    layout = plan.layout
    m = layout.members
    widths = [math.prod(shape[1:]) for shape in row_shapes]
    columns = [sum(widths[:i]) for i in range(len(widths))]
    C = plan.n_cameras
    itemsize = torch.empty((), dtype=wide).element_size()
    groups = _field_groups(widths, max(layout.counts) * C, itemsize)
    send, own_side = {}, {}
    for r in m.local:
        work = plan.work[r]
        device = m.devices[r]
        pieces = [torch.zeros((0, sum(widths)), dtype=wide, device=device)] * len(m)  # one empty piece for owners it did not read
        sources = work.sources if work is not None and r in partials else []
        own, runs = _own_and_runs(sources, r)
        if own is not None and len(groups) == 1 and all(g is not None for g in partials[r]):
            blocks = [sources]  # small: all its records side by side, its own rows added in one go too
        else:
            blocks = runs
        for block in blocks:
            if not block:  # the owners before (then after) its own records: one run of rows, all fields side by side
                continue
            lo, hi = block[0].start, block[-1].stop
            side_by_side = torch.cat([
                (g.reshape(-1, w)[lo:hi] if g is not None else torch.zeros((hi - lo, w), device=device)).to(wide)
                for g, w in zip(partials[r], widths)
            ], dim=1)
            for src in block:
                if src.source == r:
                    own_side[r] = side_by_side[src.start - lo : src.stop - lo]
                else:
                    pieces[src.source] = side_by_side[src.start - lo : src.stop - lo]
        send[r] = pieces
    got = exchange.all_to_all(m, send, kind="reduce_scatter")
    builders = [LocalRows(layout) for _ in widths]
    own = {s: _own_and_runs(plan.work[s].sources, s)[0] if plan.work[s] is not None else None
           for s in m.local}  # each local owner's reads of its own records
    senders = {s: [r for r in range(len(m)) if r == s or got[s][r].shape[0]] for s in m.local}
    for group in groups:
        lo, hi = columns[group[0]], columns[group[-1]] + widths[group[-1]]
        for s in m.local:  # local owners
            buffer = torch.zeros((layout.counts[s] * C, hi - lo), dtype=wide, device=m.devices[s])
            for r in senders[s]:  # in member order
                if r != s:
                    buffer.index_add_(0, plan.serve[s][r].to(buffer.device), got[s][r][:, lo:hi].to(buffer.device))
                elif s in own_side:
                    buffer.index_add_(0, plan.serve[s][s].to(buffer.device), own_side[s][:, lo:hi])
                else:
                    for i in group if own[s] is not None and s in partials else ():
                        g = partials[s][i]
                        if g is not None:
                            part = g.reshape(-1, widths[i])[own[s].start : own[s].stop].to(wide)
                            buffer[:, columns[i] - lo : columns[i] - lo + widths[i]].index_add_(0, plan.serve[s][s].to(buffer.device), part)
            rounded = buffer.to(dtype)  # each element rounds once, whichever group holds it
            del buffer
            for i in group:
                field = rounded[:, columns[i] - lo : columns[i] - lo + widths[i]]
                builders[i].put(s, field.view(layout.counts[s], *row_shapes[i]))  # put copies (or makes contiguous) its rows
            del rounded
        for found in partials.values():
            for i in group:
                found[i] = None
    return [b.result() for b in builders]


def tile_rasterize(
    plan: TilePlan,
    kernels: ModuleType,
    means2d: AggregateTensor,  # [N, C, 2]
    conics: AggregateTensor,  # [N, C, 3]
    colors: AggregateTensor,  # [N, C, D]
    opacities: AggregateTensor,  # [N, C]
    backgrounds: Optional[Tensor] = None,  # [C, D], not differentiated
    absgrad: bool = False,
    split_images: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Render the plan's cameras: colours [C, H, W, D] and alphas [C, H, W, 1], ordinary tensors on
    every rank; with `split_images`, [C * H, W, D] and [C * H, W, 1] aggregates over pixel rows, each
    member holding the rows it rendered (nothing assembled). Backward gives aggregate gradients for the
    four record fields and, with `absgrad`, sets `means2d.absgrad` ([N, C, 2] aggregate) as gsplat's
    kernels do."""
    N, C = opacities.shape
    D = colors.shape[2]
    assert means2d.shape == (N, C, 2) and conics.shape == (N, C, 3) and colors.shape == (N, C, D), "records must be [N, C, ...]"
    assert backgrounds is None or backgrounds.shape == (C, D), f"backgrounds must be [{C}, {D}]"
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, colors, opacities))
    return _TileRasterize.apply(plan, kernels, backgrounds, absgrad, track, split_images, means2d, conics, colors, opacities)
