"""Every transfer between members goes through this module, which counts the bytes per
(source member, destination member). On virtual members (cpu:N, cuda:0*4) nothing physically moves,
but the counts are what would cross between GPUs: rows landing on another member's chunk count, rows
staying on their member count nothing. A plain (ordinary) tensor counts as held by member 0, except
0-dim tensors, which travel with the kernel launch like Python scalars."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.storage import chunks_of, storage_for

KINDS = ("remote_read", "reduce_scatter", "other")
"""What a transfer is for: the rasterizer reading projected Gaussians held by another member, the
backward pass handing gradient partials to their owners, and everything else (re-stripes, gathers,
intersection routing, image and loss assembly)."""

_COUNTS: Dict[str, Dict[Tuple[int, int], int]] = {kind: defaultdict(int) for kind in KINDS}


def record(src: int, dst: int, nbytes: int, kind: str = "other") -> None:
    """Count `nbytes` moved from member `src` to member `dst` (nothing when they are the same)."""
    if src != dst and nbytes > 0:
        _COUNTS[kind][(src, dst)] += int(nbytes)


def exchange_counts(kind: Optional[str] = None) -> Dict[Tuple[int, int], int]:
    """Bytes moved so far per (source member, destination member), of one kind or of all kinds."""
    kinds = KINDS if kind is None else (kind,)
    total: Dict[Tuple[int, int], int] = defaultdict(int)
    for k in kinds:
        for pair, n in _COUNTS[k].items():
            total[pair] += n
    return dict(total)


def exchange_totals() -> Dict[str, int]:
    """Bytes moved so far per kind (see KINDS)."""
    return {kind: sum(_COUNTS[kind].values()) for kind in KINDS}


def reset_exchange() -> None:
    for counts in _COUNTS.values():
        counts.clear()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row of `t` ([rows, ...])."""
    return math.prod(t.shape[1:]) * t.element_size()


def move(t: torch.Tensor, src: int, dst: int, layout: Layout) -> torch.Tensor:
    """`t` (held by member `src`) on member `dst`'s device."""
    if t.dim() > 0:
        record(src, dst, nbytes(t))
    return t.to(layout.members.devices[dst], non_blocking=True)


def account_pieces(pieces: Sequence[Tuple[int, int]], layout: Layout, bytes_per_row: int) -> None:
    """Count rows arriving in `layout` from `pieces` = [(source member, row count)] in global order."""
    start = 0
    for src, n in pieces:
        for d in range(len(layout.members)):
            overlap = min(start + n, layout.bounds[d + 1]) - max(start, layout.bounds[d])
            if overlap > 0:
                record(src, d, overlap * bytes_per_row)
        start += n


def gather(chunks: Sequence[torch.Tensor], layout: Layout, whole: Optional[torch.Tensor]) -> torch.Tensor:
    """All rows as one plain tensor on member 0's device (`whole` itself where there is one)."""
    account_pieces([(d, n) for d, n in enumerate(layout.counts)], even_to_first(layout), row_bytes(chunks[0]))
    if whole is not None:
        return whole
    return torch.cat([c.to(layout.members.device, non_blocking=True) for c in chunks])


def even_to_first(layout: Layout) -> Layout:
    """A layout putting every row on member 0: the destination of a gather."""
    return Layout((0,) + (layout.rows,) * len(layout.members), layout.members)


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of data behind `t`, not counting broadcast (stride-0) repeats."""
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


def account_plain(t: torch.Tensor, layout: Layout, rowed: bool) -> None:
    """Count what the members read of a plain operand held by member 0: their rows of it when it
    carries the rows (`rowed`), else all of it (0-dim tensors travel free, as launch arguments)."""
    if t.dim() == 0:
        return
    if rowed and t.stride(0) != 0:
        account_pieces([(0, layout.rows)], layout, row_bytes(t))
        return
    for d, n in enumerate(layout.counts):
        if n:
            record(0, d, distinct_bytes(t))


def rows_of(plain: torch.Tensor, layout: Layout) -> List[torch.Tensor]:
    """Each member's rows of a plain rowed tensor, on its device (counted by `account_plain`)."""
    b = layout.bounds
    return [to_member(plain[b[d] : b[d + 1]], d, layout) for d in range(len(layout.members))]


def to_member(x, d: int, layout: Layout):
    """A plain operand on member d's device (counted by `account_plain`); non-tensors as they are."""
    device = layout.members.devices[d]
    if torch.is_tensor(x) and x.dim() > 0 and x.device != device:
        return x.to(device, non_blocking=True)
    return x


def reduce_to_first(partials: Sequence[Tuple[int, torch.Tensor]], layout: Layout) -> List[torch.Tensor]:
    """Per-member partial results [(member, tensor)] brought to member 0 for combining."""
    return [move(p, d, 0, layout) for d, p in partials]


def assemble(
    pieces: Sequence[Tuple[int, torch.Tensor]], layout: Layout, fuse: bool
) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """The re-stripe: rows of `pieces` = [(source member, rows)] in global order, laid out as `layout`.

    Returns (whole, chunks) of fresh storage. With `fuse` (one device, contiguous storage) the copy is
    one `torch.cat`; otherwise each destination chunk receives its overlapping piece rows."""
    ref = pieces[0][1]
    account_pieces([(s, t.shape[0]) for s, t in pieces], layout, row_bytes(ref))
    whole, chunks = storage_for(layout).empty(layout, ref.shape[1:], ref.dtype)
    if fuse and whole is not None:
        torch.cat([t for _, t in pieces], out=whole)
        return whole, chunks
    start = 0
    for _, t in pieces:
        for d, chunk in enumerate(chunks):
            lo, hi = max(start, layout.bounds[d]), min(start + t.shape[0], layout.bounds[d + 1])
            if hi > lo:
                chunk[lo - layout.bounds[d] : hi - layout.bounds[d]].copy_(t[lo - start : hi - start], non_blocking=True)
        start += t.shape[0]
    return whole, chunks


def take(
    chunks: Sequence[torch.Tensor], layout: Layout, index: torch.Tensor, out_layout: Layout, fuse_whole: Optional[torch.Tensor]
) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """Rows `index` ([K] global row numbers, held by member 0, negative counted from the end) of a
    tensor laid out as `layout`, re-striped as `out_layout` (K rows): destination member d reads the
    rows of its share from their owners."""
    index = torch.where(index < 0, index + layout.rows, index) if index.numel() else index
    n = len(layout.members)
    account_pieces([(0, index.shape[0])], out_layout, index.element_size())
    dest = row_owners(out_layout, index.device)
    pairs = torch.bincount(layout.owners(index) * n + dest, minlength=n * n).tolist()
    per_row = row_bytes(chunks[0])
    for p, count in enumerate(pairs):
        record(p // n, p % n, count * per_row)
    if fuse_whole is not None:
        whole = fuse_whole.index_select(0, index)
        return whole, chunks_of(whole, out_layout)
    whole, out = storage_for(out_layout).empty(out_layout, chunks[0].shape[1:], chunks[0].dtype)
    owners = layout.owners(index)
    for d, chunk in enumerate(out):
        lo, hi = out_layout.bounds[d], out_layout.bounds[d + 1]
        idx, own = index[lo:hi], owners[lo:hi]
        for s in range(n):
            sel = torch.nonzero(own == s).squeeze(1)
            if sel.numel():
                rows = chunks[s].index_select(0, (idx[sel] - layout.bounds[s]).to(chunks[s].device))
                chunk.index_copy_(0, sel.to(chunk.device), rows.to(chunk.device, non_blocking=True))
    return whole, out


def row_owners(layout: Layout, device: torch.device) -> torch.Tensor:
    """The member owning each row of `layout` ([rows] member numbers)."""
    counts = torch.tensor(layout.counts, device=device)
    return torch.repeat_interleave(torch.arange(len(layout.members), device=device), counts, output_size=layout.rows)
