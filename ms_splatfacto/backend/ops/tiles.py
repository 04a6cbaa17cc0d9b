"""Tile intersection split by key range (the plan that `tile_raster.py` renders by tile range).

The camera-major list of (camera, tile) keys is cut into contiguous, even ranges, one per member.
Each Gaussian's owner intersects its Gaussians with the tiles (the unchanged kernel on its chunk) and
routes each intersection to the member whose range holds the key (its sorted list cut into
contiguous runs, one per range); that member sorts what it receives
(sources arrive in global row order, each already sorted, so a stable sort of the concatenation gives
exactly the single-device order, and the members' lists concatenated are globally sorted: no merge).

The plan also tells each owner which of its projected records (one Gaussian in one camera) each
member will read when it renders its tiles.

Every step is SPMD: a rank works for its own members only, and all data for another member goes
through the exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout, even_bounds
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor
from ms_splatfacto.backend.host_syncs import read_ints


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
    records they name (held by r's rank only)."""

    cam_lo: int
    cam_hi: int
    isect_ids: Optional[Tensor]  # [M_r] int64, sorted: (camera, tile, depth) keys of the member's range
    offsets: Optional[Tensor]  # [C_r, tile_height, tile_width] int32, into flatten_ids
    flatten_ids: Optional[Tensor]  # [M_r] int32, into the member's records
    records: Tensor  # [n_records] int64: global row * C + camera of each record, sorted
    n_records: int
    sources: List[SourceRecords]
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
    """Who renders which tiles and reads which records, for one set of cameras. `work` and `serve`
    hold entries for this rank's members only."""

    layout: Layout  # of the Gaussians
    n_cameras: int
    width: int
    height: int
    tile_size: int
    tile_width: int
    tile_height: int
    tile_bounds: List[int]  # [members + 1] in camera-major tile order, at whole tile rows
    work: List[Optional[MemberTiles]]  # per member: None for members without tiles or of other ranks
    serve: Dict[int, List[Tensor]]  # local owner s -> [n]: its flat records each member r reads, in r's order
    pixel_owner: Tensor  # [C, H, W] the member rendering each pixel
    n_isects: int

    def release_render_tensors(self) -> None:
        """Drop what only the render and its backward read (intersections, offsets, the owners' serve
        lists): the plan stays in the step's info through the rest of the backward, where they would
        be about 40 B per Gaussian at its peak. Which records each member read stays."""
        for work in self.work:
            if work is not None:
                work.isect_ids = work.offsets = work.flatten_ids = None
        self.serve = {}

    def pixel_row_bounds(self) -> List[int]:
        """[members + 1]: member r renders rows [b[r], b[r+1]) of the [C * H] pixel rows (camera-major)."""
        return _pixel_row_bounds(self.tile_bounds, self.tile_width, self.tile_height, self.height, self.tile_size)

    def remote_page_bytes(self, record_bytes: List[int], page_bytes: int = 4096) -> int:
        """Remote reads at page granularity: the bytes of every page of another member's record arrays
        (one per field, `record_bytes` per (row, camera) record) that this rank's members read from.
        What moves where managed memory migrates pages rather than serving cache lines; the Morton
        order makes a member's reads land on fewer pages."""
        total = 0
        for r, work in enumerate(self.work):
            for src in work.sources if work is not None else ():
                if src.source != r:
                    total += sum(torch.unique(src.flat * rb // page_bytes).numel() for rb in record_bytes) * page_bytes
        return total


def _pixel_row_bounds(tile_bounds: List[int], tile_width: int, tile_height: int, height: int, tile_size: int) -> List[int]:
    def pixel_row(tile: int) -> int:
        camera, row = divmod(tile // tile_width, tile_height)
        return camera * height + min(row * tile_size, height)

    return [pixel_row(t) for t in tile_bounds]


def plan_tiles(
    kernels: ModuleType,
    means2d: AggregateTensor,  # [N, C, 2]
    radii: AggregateTensor,  # [N, C] int32
    depths: AggregateTensor,  # [N, C]
    width: int,
    height: int,
    tile_size: int,
) -> TilePlan:
    """Intersect every member's Gaussians with the tiles, route the intersections to the members
    owning their key ranges, and tell each owner which records each member will read (both counted
    as "other" traffic)."""
    N, C = radii.shape
    assert means2d.shape == (N, C, 2) and depths.shape == (N, C), "projected records must be Gaussian-major [N, C, ...]"
    layout = radii._layout
    m = layout.members
    n_members = len(m)
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    per_camera = tile_width * tile_height
    tile_bits = per_camera.bit_length()
    tile_bounds = [rows * tile_width for rows in even_bounds(C * tile_height, n_members)]  # whole tile rows
    # [members + 1] the first isect id of each member's key range (camera << tile_bits | tile, then depth bits)
    first_keys = torch.tensor([((b // per_camera << tile_bits) | (b % per_camera)) << 32 for b in tile_bounds], dtype=torch.long)
    sorted_pairs: Dict[int, Tensor] = {}
    cuts: Dict[int, Tensor] = {}
    for s in m.local:
        device = m.devices[s]
        n_s = layout.counts[s]
        if n_s == 0 or C == 0:
            continue
        _, ids, flat = kernels.isect_tiles(
            means2d.chunks[s].transpose(0, 1).contiguous(), radii.chunks[s].t().contiguous(),
            depths.chunks[s].t().contiguous(), tile_size, tile_width, tile_height,
        )
        flat = flat.long()
        record = (layout.bounds[s] + flat % n_s) * C + flat // n_s  # global row * C + camera
        del flat  # [M_s] temporaries are freed as soon as they are used: they scale with N
        # isect_tiles sorts its keys and a key range is a span of (camera, tile) keys, so each destination's
        # intersections are already one contiguous run: cut it by binary search, no sort, no gather.
        cuts[s] = torch.searchsorted(ids, first_keys.to(device))
        sorted_pairs[s] = torch.stack([ids, record], dim=1)  # [M_s, 2]: key, record
        del ids, record
    ends = read_ints(cuts)  # the one host read of this phase, for all local members
    send: Dict[int, List[Tensor]] = {}
    for s in m.local:
        if s in ends:  # most owners reach few key ranges: one shared empty piece for the rest
            empty = sorted_pairs[s][:0]
            send[s] = [sorted_pairs[s][ends[s][r] : ends[s][r + 1]] if ends[s][r + 1] > ends[s][r] else empty for r in range(n_members)]
        else:
            send[s] = [torch.zeros((0, 2), dtype=torch.long, device=m.devices[s])] * n_members
    routed = exchange.all_to_all(m, send)
    del send, sorted_pairs
    pixel_owner = _pixel_owners(torch.tensor(tile_bounds[1:-1], dtype=torch.long, device=m.device), C, width, height,
                                tile_size, tile_width, tile_height)
    n_isects = sum(p.shape[0] for r in m.local for p in routed[r])
    sorted_routes = {}
    for r in m.local:
        if tile_bounds[r + 1] > tile_bounds[r]:
            sorted_routes[r] = _sort_routed(kernels, r, routed[r], tile_bounds, layout, C, tile_width, tile_height, tile_bits)
        routed[r] = None  # its pairs are sorted: the [M, 2] pieces can go
    del routed
    source_ends = read_ints({r: routes.source_cuts for r, routes in sorted_routes.items()})  # this phase's one read
    row_bounds = _pixel_row_bounds(tile_bounds, tile_width, tile_height, height, tile_size)
    work: List[Optional[MemberTiles]] = [None] * n_members
    asks: Dict[int, List[Tensor]] = {}
    for r in m.local:
        if r in sorted_routes:
            n_pixels = (row_bounds[r + 1] - row_bounds[r]) * width
            work[r] = _member_tiles(r, sorted_routes[r], source_ends[r], layout, C, n_pixels)
        asks[r] = _asks(work[r], r, layout)
    serve = exchange.all_to_all(m, asks) if m.local else {}
    return TilePlan(layout, C, width, height, tile_size, tile_width, tile_height, tile_bounds, work, serve, pixel_owner, n_isects)


def _asks(work: Optional[MemberTiles], r: int, layout: Layout) -> List[Tensor]:
    """What member r reads of each owner ([n] flat record lists; empty for owners it does not read)."""
    device = layout.members.devices[r]
    out = [torch.zeros(0, dtype=torch.long, device=device)] * len(layout.members)  # one empty list for the owners it skips
    for src in work.sources if work is not None else ():
        out[src.source] = src.flat
    return out


def _pixel_owners(
    edges: Tensor, C: int, width: int, height: int, tile_size: int, tile_width: int, tile_height: int
) -> Tensor:
    """[C, H, W] member rendering each pixel (`edges`: the members' first camera-major tiles but 0's)."""
    device = edges.device
    ty = torch.arange(height, device=device) // tile_size
    tx = torch.arange(width, device=device) // tile_size
    tile = (torch.arange(C, device=device)[:, None, None] * tile_height + ty[None, :, None]) * tile_width + tx[None, None, :]
    return torch.bucketize(tile, edges, right=True)


@dataclass
class _SortedRoutes:
    """Member r's received intersections in single-device order, before the host knows the sizes."""

    cam_lo: int
    cam_hi: int
    isect_ids: Tensor  # [M_r] int64, sorted
    offsets: Tensor  # [C_r, tile_height, tile_width] int32
    flatten_ids: Tensor  # [M_r] int32, into `records`
    records: Tensor  # [n_records] int64, sorted: global row * C + camera
    source_cuts: Tensor  # [n + 1] int64: source s's records are records[cuts[s] : cuts[s + 1]]


def _sort_routed(
    kernels: ModuleType,
    r: int,
    routed: List[Tensor],  # [n] pieces [k, 2]: (key, record) from each source, in source order
    tile_bounds: List[int],
    layout: Layout,
    C: int,
    tile_width: int,
    tile_height: int,
    tile_bits: int,
) -> _SortedRoutes:
    per_camera = tile_width * tile_height
    cam_lo, cam_hi = tile_bounds[r] // per_camera, (tile_bounds[r + 1] - 1) // per_camera
    pieces = [p for p in routed if p.shape[0]]
    pairs = (pieces[0] if len(pieces) == 1 else torch.cat(routed)).to(layout.members.devices[r])
    ids, records = pairs[:, 0].contiguous(), pairs[:, 1]  # the plan keeps the keys alone, not the [M, 2] pairs
    del pairs
    if len(pieces) != 1:  # one source's keys come sorted (every kernel set's isect_tiles sorts): no sort, no host read
        ids, order = torch.sort(ids, stable=True)  # sources arrive in global row order: stable = one device's order
        records = records[order]
        del order
    sent = [s for s, p in enumerate(routed) if p.shape[0]]
    span = (layout.bounds[sent[0]] * C, layout.bounds[sent[-1] + 1] * C) if sent else (0, 0)
    unique, flatten_ids = _unique_in_span(records, *span)
    del records
    offsets = kernels.isect_offset_encode(ids - (cam_lo << (32 + tile_bits)), cam_hi - cam_lo + 1, tile_width, tile_height)
    firsts = torch.tensor([b * C for b in layout.bounds], dtype=unique.dtype, device=unique.device)
    return _SortedRoutes(cam_lo, cam_hi, ids, offsets, flatten_ids.int(), unique, torch.searchsorted(unique, firsts))


def _unique_in_span(values: Tensor, lo: int, hi: int) -> Tuple[Tensor, Tensor]:  # values: [M] int64 in [lo, hi)
    """`torch.unique(values, return_inverse=True)` by marking a [hi - lo] table instead of sorting: the
    records a member reads lie in its sources' rows, known on the host, and a mark, a prefix sum and
    two gathers cost less than sorting M intersections (the same result, bit for bit)."""
    present = torch.zeros(hi - lo, dtype=torch.bool, device=values.device)
    local = values - lo
    present[local] = True
    unique = present.nonzero().squeeze(1) + lo
    rank = torch.cumsum(present, 0) - 1
    del present
    return unique, rank[local]


def _member_tiles(
    r: int,
    routes: _SortedRoutes,
    cuts: List[int],  # [n + 1] `routes.source_cuts`, read on the host
    layout: Layout,
    C: int,
    n_pixels: int,
) -> MemberTiles:
    unique = routes.records
    sources = [
        SourceRecords(s, cuts[s], cuts[s + 1], unique[cuts[s] : cuts[s + 1]] - layout.bounds[s] * C)
        for s in range(len(layout.members))
        if cuts[s + 1] > cuts[s]
    ]
    return MemberTiles(
        routes.cam_lo, routes.cam_hi, routes.isect_ids, routes.offsets, routes.flatten_ids, unique, cuts[-1], sources, n_pixels,
    )
