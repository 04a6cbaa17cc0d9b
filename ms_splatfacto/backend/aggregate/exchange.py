"""Every transfer between members goes through this module: it is the only code that touches data for
another member. Its primitives are collective (SPMD): every rank calls them with the parts of its own
members, and gets what its own members receive.

Two transports: between members of one process an in-process copy (`.to(device)` between GPUs,
nothing at all on the CPU); between ranks torch.distributed (`transport.py`). Bytes are counted where
they are sent, per (source member, destination member) and kind; a piece that stays on its member
counts nothing. In one process the counts are those of the whole device; with ranks, each rank counts
what its members send (sum them over ranks for the whole). Ordinary tensors are replicated: every rank
holds the same value on its first member (its host), so reading one costs a copy only to the rank's
other members.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate import transport
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.storage import storage_for
from ms_splatfacto.backend.host_syncs import read_ints

KINDS = ("remote_read", "reduce_scatter", "other")
"""What a transfer is for: the rasterizer reading projected Gaussians held by another member, the
backward pass handing gradient partials to their owners, and everything else (re-stripes, gathers,
intersection routing, image and loss assembly)."""

_COUNTS: Dict[str, Dict[Tuple[int, int], int]] = {kind: defaultdict(int) for kind in KINDS}

Chunks = List[Optional[torch.Tensor]]
"""One entry per member: a local member's rows, None for members of other ranks."""


def record(src: int, dst: int, nbytes: int, kind: str = "other") -> None:
    """Count `nbytes` moved from member `src` to member `dst` (nothing when they are the same)."""
    if src != dst and nbytes > 0:
        _COUNTS[kind][(src, dst)] += int(nbytes)


def exchange_counts(kind: Optional[str] = None) -> Dict[Tuple[int, int], int]:
    """Bytes sent so far per (source member, destination member), of one kind or of all kinds."""
    kinds = KINDS if kind is None else (kind,)
    total: Dict[Tuple[int, int], int] = defaultdict(int)
    for k in kinds:
        for pair, n in _COUNTS[k].items():
            total[pair] += n
    return dict(total)


def exchange_totals() -> Dict[str, int]:
    """Bytes sent so far per kind (see KINDS)."""
    return {kind: sum(_COUNTS[kind].values()) for kind in KINDS}


def wire_totals() -> Dict[str, int]:
    """Bytes this rank handed to torch.distributed, per kind (and "meta" for sizes)."""
    return transport.wire_totals()


def reset_exchange() -> None:
    for counts in _COUNTS.values():
        counts.clear()
    transport.reset_wire()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row of `t` ([rows, ...])."""
    return math.prod(t.shape[1:]) * t.element_size()


# ---------------------------------------------------------------------------------------------------
# the one collective: every member sends every member a piece of rows


def all_to_all(
    members,
    send: Mapping[int, Sequence[torch.Tensor]],  # local s -> [n] pieces [rows_sr, *trailing], one dtype
    kind: str = "other",
    rows: Optional[Sequence[Sequence[int]]] = None,  # [n, n] row counts; rows[s][r] read for local r only
) -> Dict[int, List[torch.Tensor]]:
    """Member s's piece `send[s][r]` delivered to member r: returns, for each local r, the [n] pieces it
    received in source order. Where the receivers do not know their `rows`, they are exchanged first."""
    n = len(members)
    ref = next(p for s in members.local for p in send[s])
    trailing, dtype = tuple(ref.shape[1:]), ref.dtype
    recv: Dict[int, List[Optional[torch.Tensor]]] = {r: [None] * n for r in members.local}
    for s in members.local:
        pieces = send[s]
        assert len(pieces) == n and all(tuple(p.shape[1:]) == trailing and p.dtype == dtype for p in pieces), (
            f"member {s}'s pieces must be {n} tensors [rows, {list(trailing)}] of {dtype}"
        )
        for r in members.local:  # one device: the piece itself (no copy, no per-pair `.to` call)
            piece = pieces[r]
            recv[r][s] = piece if members.single_device else piece.to(members.devices[r], non_blocking=True)
            if s != r and piece.shape[0]:
                record(s, r, nbytes(piece), kind)
    if members.world_size > 1:
        if rows is None:
            rows = transport.exchange_rows(members, {s: [p.shape[0] for p in send[s]] for s in members.local})
        transport.all_to_all(members, send, rows, recv, trailing, dtype, kind, record)
    return recv  # type: ignore[return-value]


def _empty(like: Tuple[Sequence[int], torch.dtype], device: torch.device, rows: int = 0) -> torch.Tensor:
    trailing, dtype = like
    return torch.empty((rows, *trailing), dtype=dtype, device=device)


def replicate(
    members,
    parts: Mapping[int, torch.Tensor],  # local d -> [rows_d, ...] (0-dim: one value)
    kind: str = "other",
    rows_per_member: Optional[Sequence[int]] = None,
) -> List[torch.Tensor]:
    """Every member's part, in member order, on this rank's host device: what each rank needs to
    combine per-member partials the same way (and in the same order) as every other rank.
    `rows_per_member`: the parts' row counts where every rank knows them (else exchanged)."""
    scalar = all(parts[d].dim() == 0 for d in members.local)
    local = {d: parts[d].reshape(1) if scalar else parts[d] for d in members.local}
    hosts = set(members.hosts)
    n = len(members)
    empties = {s: p[:0] for s, p in local.items()}  # one empty piece per sender, not one per pair
    send = {s: [p if r in hosts else empties[s] for r in range(n)] for s, p in local.items()}
    rows = None
    if rows_per_member is not None:
        rows = [[rows_per_member[s] if r in hosts else 0 for r in range(n)] for s in range(n)]
    got = all_to_all(members, send, kind, rows)[members.host]
    return [g.to(members.device).reshape(()) if scalar else g.to(members.device) for g in got]


def restripe(
    sources: Sequence[Tuple[int, int]],  # [(member, rows)] in global order, the same on every rank
    tensors: Mapping[int, torch.Tensor],  # source index -> its rows, for the sources of local members
    layout: Layout,
    like: Tuple[Sequence[int], torch.dtype],  # (row shape, dtype) of the rows
    kind: str = "other",
    fuse: bool = False,
) -> Tuple[Optional[torch.Tensor], Chunks]:
    """The rows of `sources`, in order, laid out as `layout`: returns (whole, chunks) of fresh storage.
    With `fuse` (one rank, one device) the copy is one `torch.cat`."""
    m, n = layout.members, len(layout.members)
    starts = [0]
    for _, count in sources:
        starts.append(starts[-1] + count)
    assert starts[-1] == layout.rows, f"sources hold {starts[-1]} rows, the layout {layout.rows}"
    bounds = layout.bounds

    def overlap(i: int, r: int) -> Tuple[int, int]:
        return max(starts[i], bounds[r]), min(starts[i + 1], bounds[r + 1])

    rows = [[0] * n for _ in range(n)]
    for i, (s, _) in enumerate(sources):
        for r in range(n):
            lo, hi = overlap(i, r)
            rows[s][r] += max(0, hi - lo)
    whole, chunks = storage_for(layout).empty(layout, like[0], like[1])
    if fuse and whole is not None and m.world_size == 1:
        restripe_counts(sources, layout, math.prod(like[0]) * like[1].itemsize)
        if sources:
            torch.cat([tensors[i] for i in range(len(sources))], out=whole)
        return whole, chunks
    send: Dict[int, List[torch.Tensor]] = {}
    for s in m.local:
        mine = [i for i, (src, _) in enumerate(sources) if src == s]
        send[s] = []
        for r in range(n):
            slices = [tensors[i][max(0, overlap(i, r)[0] - starts[i]) : max(0, overlap(i, r)[1] - starts[i])] for i in mine]
            slices = [t for t in slices if t.shape[0]]
            send[s].append(torch.cat(slices) if len(slices) > 1 else slices[0] if slices else _empty(like, m.devices[s]))
    recv = all_to_all(m, send, kind, rows)
    for r in m.local:
        taken = [0] * n
        for i, (s, _) in enumerate(sources):
            lo, hi = overlap(i, r)
            if hi > lo:
                piece = recv[r][s][taken[s] : taken[s] + hi - lo]
                chunks[r][lo - bounds[r] : hi - bounds[r]].copy_(piece, non_blocking=True)
                taken[s] += hi - lo
    return whole, chunks


def restripe_counts(sources: Sequence[Tuple[int, int]], layout: Layout, bytes_per_row: int) -> None:
    """Count a re-stripe of `sources` ([(member, rows)] in global order) into `layout` done without
    moving anything (one rank, one device)."""
    start = 0
    for s, count in sources:
        for r in range(len(layout.members)):
            overlap = min(start + count, layout.bounds[r + 1]) - max(start, layout.bounds[r])
            if overlap > 0:
                record(s, r, overlap * bytes_per_row)
        start += count


def all_rows(chunks: Chunks, layout: Layout, like: Tuple[Sequence[int], torch.dtype], kind: str = "other") -> torch.Tensor:
    """Every row in global order as one ordinary tensor on each rank's host (an all-gather)."""
    m = layout.members
    got = replicate(m, {d: chunks[d] for d in m.local}, kind) if m.world_size > 1 or len(m) > 1 else [chunks[0]]
    if not got:
        return _empty(like, m.device)
    return torch.cat([g.to(m.device) for g in got]) if len(got) > 1 else got[0]


def member_counts(members, local: Mapping[int, int]) -> List[int]:
    """Every member's integer (a row count), from each rank's own members' (sizes travel as "meta")."""
    if members.world_size == 1:
        return [int(local[d]) for d in range(len(members))]
    return transport.sum_ints(members, [int(local[d]) if members.is_local(d) else 0 for d in range(len(members))])


def sum_over_ranks(members, values: Sequence[int]) -> List[int]:
    """Element-wise sum over the ranks of each rank's integers (per-member figures each rank knows for
    its own members), the same list on every rank; sizes travel as "meta"."""
    if members.world_size == 1:
        return [int(v) for v in values]
    return transport.sum_ints(members, values)


def replicate_counts(layout: Layout, bytes_per_row: int) -> None:
    """Count an all-gather of `layout`'s rows done without moving anything (one rank, one device)."""
    for s, count in enumerate(layout.counts):
        for host in layout.members.hosts:
            record(s, host, count * bytes_per_row)


def request_rows(
    members,
    requests: Mapping[int, torch.Tensor],  # local r -> [k_r] long: global rows it wants, of `layout`
    layout: Layout,
    chunks: Chunks,  # the rows' owners' chunks
    kind: str = "other",
) -> Dict[int, torch.Tensor]:
    """Rows by global index, read from their owners: for each local r, `chunks` rows requests[r]
    ([k_r, ...], in request order). Two exchanges: the indices to the owners, the rows back; the host
    reads how many rows each owner serves once for all local members."""
    n = len(members)
    edges = list(layout.bounds)
    order: Dict[int, torch.Tensor] = {}
    by_owner: Dict[int, torch.Tensor] = {}
    cuts: Dict[int, torch.Tensor] = {}
    for r in members.local:
        idx = requests[r]
        sorted_owner, order[r] = torch.sort(layout.owners(idx), stable=True)
        cuts[r] = torch.searchsorted(sorted_owner, torch.arange(n + 1, device=idx.device))
        by_owner[r] = idx[order[r]]
    ends = read_ints(cuts)
    ask = {r: [by_owner[r][ends[r][s] : ends[r][s + 1]] - edges[s] for s in range(n)] for r in members.local}
    received = _serve_rows(members, ask, chunks, kind)
    out = {}
    for r in members.local:
        placed = torch.empty_like(received[r])
        placed[order[r].to(placed.device)] = received[r]
        out[r] = placed
    return out


def request_row_ranges(
    members,
    ranges: Sequence[Tuple[int, int]],  # [n] member r wants global rows [lo, hi) of `layout` (every rank knows all)
    layout: Layout,
    chunks: Chunks,  # the rows' owners' chunks
    kind: str = "other",
) -> Dict[int, torch.Tensor]:
    """`request_rows` for a contiguous range per member known on every rank: each owner slices what
    each member wants of its chunk and one exchange delivers it (no index lists, no host read)."""
    n = len(members)
    edges = list(layout.bounds)
    assert len(ranges) == n, f"need a row range for each of the {n} members, got {len(ranges)}"
    spans = [[(min(max(lo, edges[s]), edges[s + 1]), max(min(hi, edges[s + 1]), edges[s])) for s in range(n)] for lo, hi in ranges]
    rows = [[max(0, spans[r][s][1] - spans[r][s][0]) for r in range(n)] for s in range(n)]
    reply = {}
    for s in members.local:
        empty = chunks[s][:0]
        reply[s] = [chunks[s][spans[r][s][0] - edges[s] : spans[r][s][0] - edges[s] + rows[s][r]] if rows[s][r] else empty
                    for r in range(n)]
    return _joined(members, all_to_all(members, reply, kind, rows), chunks)


def _serve_rows(
    members,
    ask: Mapping[int, List[torch.Tensor]],  # local r -> [n]: rows (local to owner s) it reads from each s
    chunks: Chunks,
    kind: str,
) -> Dict[int, torch.Tensor]:
    """The rows each local member asked for, in owner order then ask order."""
    n = len(members)
    asked = all_to_all(members, ask, kind)
    reply = {s: [chunks[s].index_select(0, asked[s][r].to(chunks[s].device)) for r in range(n)] for s in members.local}
    rows = [[0] * n for _ in range(n)]
    for r in members.local:
        for s in range(n):
            rows[s][r] = ask[r][s].shape[0]
    return _joined(members, all_to_all(members, reply, kind, rows), chunks)


def _joined(members, got: Mapping[int, List[torch.Tensor]], chunks: Chunks) -> Dict[int, torch.Tensor]:
    """Each local member's received pieces in owner order as one tensor (an empty one of the chunks'
    row shape where nothing came)."""
    ref = next(c for c in chunks if c is not None)
    out = {}
    for r in members.local:
        pieces = [p for p in got[r] if p.shape[0]]
        received = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else None
        out[r] = received if received is not None else _empty((ref.shape[1:], ref.dtype), members.devices[r])
    return out


# ---------------------------------------------------------------------------------------------------
# ordinary (replicated) operands read by members of this rank


def to_member(x, d: int, layout: Layout):
    """An ordinary operand on member d's device (counted by `account_plain`); non-tensors as they are."""
    device = layout.members.devices[d]
    if torch.is_tensor(x) and x.dim() > 0 and x.device != device:
        return x.to(device, non_blocking=True)
    return x


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of data behind `t`, not counting broadcast (stride-0) repeats."""
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


def account_plain(t: torch.Tensor, layout: Layout, rowed: bool) -> None:
    """Count what this rank's members read of an ordinary operand kept on the rank's host: their rows
    of it when it carries the rows (`rowed`), else all of it (0-dim tensors travel free, as launch
    arguments)."""
    if t.dim() == 0:
        return
    m = layout.members
    for d in m.local:
        n = layout.counts[d]
        if n:
            record(m.host, d, n * row_bytes(t) if rowed and t.stride(0) != 0 else distinct_bytes(t))


def rows_of(plain: torch.Tensor, layout: Layout) -> Chunks:
    """Each local member's rows of an ordinary rowed tensor, on its device (counted by `account_plain`)."""
    b, m = layout.bounds, layout.members
    return [to_member(plain[b[d] : b[d + 1]], d, layout) if m.is_local(d) else None for d in range(len(m))]
