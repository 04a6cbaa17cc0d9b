"""How data moves between layouts (after DTensor's `_redistribute.py`): re-stripes, row selection by
index or mask, and ordinary (replicated) results. Every byte goes through the exchange."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_map

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout, even_layout
from ms_splatfacto.backend.aggregate.propagation import is_agg
from ms_splatfacto.backend.aggregate.storage import is_persistent, mark_persistent, storage_for
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, aggregate, fusing, to_plain, wrap


def like_of(x: torch.Tensor) -> Tuple[Tuple[int, ...], torch.dtype]:
    """(row shape, dtype): what a receiver needs to allocate rows of `x`."""
    return tuple(x.shape[1:]), x.dtype


def relayout(x: AggregateTensor, layout: Layout) -> AggregateTensor:
    """`x` laid out as `layout` (a re-stripe through the exchange when it differs)."""
    if x._layout == layout:
        return x
    return from_sources([(d, n) for d, n in enumerate(x._layout.counts)], _local(x), layout, like_of(x))


def keep_persistent(out: AggregateTensor, source: AggregateTensor) -> AggregateTensor:
    """`out` as persistent rows where `source` is persistent (rows taken from, or shaped after, model
    state are model state; see storage.py)."""
    return persistent_rows(out) if is_persistent(source) else out


def persistent_rows(out: AggregateTensor) -> AggregateTensor:
    """`out` as model state: marked in place where persistent rows live like transient ones, else
    copied into persistent storage (the managed mode)."""
    if is_persistent(out):
        return out
    layout = out._layout
    if not layout.members.managed_memory:
        for d in layout.members.local:
            mark_persistent(out.chunks[d])
        return out
    whole, chunks = storage_for(layout).empty(layout, out.shape[1:], out.dtype, persistent=True)
    for d in layout.members.local:
        chunks[d].copy_(out.chunks[d], non_blocking=True)
    return wrap(layout, whole, chunks)


def _local(x: AggregateTensor) -> Dict[int, torch.Tensor]:
    return {d: x.chunks[d] for d in x.members.local}


def from_sources(
    sources: Sequence[Tuple[int, int]],  # [(member, rows)] in global order
    tensors: Mapping[int, torch.Tensor],  # source index -> rows, for this rank's sources
    layout: Layout,
    like: Tuple[Sequence[int], torch.dtype],
) -> AggregateTensor:
    """A new aggregate in `layout` holding the sources' rows in order."""
    whole, chunks = exchange.restripe(sources, tensors, layout, like, fuse=fusing(layout))
    return wrap(layout, whole, chunks)


def even_from_pieces(members, pieces: Mapping[int, torch.Tensor], like) -> AggregateTensor:
    """A new even aggregate from each local member's rows `pieces[d]` (in member order); the row
    counts of other ranks' pieces are learnt through the exchange."""
    counts = exchange.member_counts(members, {d: pieces[d].shape[0] for d in members.local})
    layout = even_layout(sum(counts), members)
    return from_sources(list(enumerate(counts)), dict(pieces), layout, like)


def from_member(members, root: int, t: Optional[torch.Tensor], rows: int, like) -> AggregateTensor:
    """A result computed on member `root` (`t` there, None elsewhere; `rows` known everywhere)
    re-striped evenly."""
    return from_sources([(root, rows)], {0: t} if members.is_local(root) else {}, even_layout(rows, members), like)


def gather_to(members, root: int, pieces: Mapping[int, torch.Tensor], rows: Sequence[int], kind: str = "other"):
    """Each member's piece ([rows[d], ...]) on member `root`, in member order (None off its rank)."""
    n = len(members)
    send = {s: [pieces[s] if r == root else pieces[s][:0] for r in range(n)] for s in members.local}
    matrix = [[rows[s] if r == root else 0 for r in range(n)] for s in range(n)]
    got = exchange.all_to_all(members, send, kind, matrix)
    return got[root] if members.is_local(root) else None


def plain_result(members, root: int, t: Optional[torch.Tensor], like) -> torch.Tensor:
    """An ordinary result computed on member `root` (None on other ranks), replicated to every rank."""
    n = len(members)
    rows = exchange.member_counts(members, {d: (t.shape[0] if d == root else 0) for d in members.local})
    parts = {d: t if d == root else torch.empty((0, *like[0]), dtype=like[1], device=members.devices[d]) for d in members.local}
    got = exchange.replicate(members, parts, rows_per_member=rows)
    return got[root]


def to_plain_args(args, kwargs):
    """The arguments with every aggregate replaced by its ordinary (all-gathered) copy."""
    convert = lambda a: to_plain(a) if is_agg(a) else a  # noqa: E731
    return tree_map(convert, args), tree_map(convert, kwargs)


def gathered(func, args: tuple, kwargs: dict):
    """Run `func` on ordinary tensors: aggregates all-gathered through the exchange; every rank
    computes the same (replicated) result."""
    p_args, p_kwargs = to_plain_args(args, kwargs)
    return func(*p_args, **p_kwargs)


def take_rows(x: AggregateTensor, index: torch.Tensor) -> AggregateTensor:
    """Rows `index` ([K] long global rows, negative from the end; aggregate or ordinary) of `x`,
    re-striped evenly: each member reads the rows of its share from their owners."""
    m = x.members
    out_layout = even_layout(index.shape[0], m)
    if is_agg(index):
        index = relayout(index, out_layout)
        mine = {d: index.chunks[d] for d in m.local}
    else:
        index = index.to(m.device)
        exchange.account_plain(index, out_layout, rowed=True)
        mine = {d: exchange.to_member(index[out_layout.bounds[d] : out_layout.bounds[d + 1]], d, out_layout) for d in m.local}
    mine = {d: torch.where(i < 0, i + x.shape[0], i) if i.numel() else i for d, i in mine.items()}
    if fusing(out_layout) and x._whole is not None:
        idx = torch.cat([mine[d] for d in m.local])
        _count_take(x._layout, out_layout, idx, exchange.row_bytes(x))
        return keep_persistent(wrap(out_layout, x._whole.index_select(0, idx)), x)
    rows = exchange.request_rows(m, mine, x._layout, x.chunks)
    return keep_persistent(_wrap_local(out_layout, rows, like_of(x)), x)


def _count_take(layout: Layout, out_layout: Layout, index: torch.Tensor, per_row: int) -> None:
    """Count a fused take as the exchange would move it: index requests out and rows back."""
    n = len(layout.members)
    dest = torch.repeat_interleave(torch.arange(n), torch.tensor(out_layout.counts), output_size=out_layout.rows)
    pairs = torch.bincount(layout.owners(index) * n + dest, minlength=n * n).tolist()
    for p, count in enumerate(pairs):
        exchange.record(p % n, p // n, count * index.element_size())
        exchange.record(p // n, p % n, count * per_row)


def _wrap_local(layout: Layout, rows: Mapping[int, torch.Tensor], like) -> AggregateTensor:
    """An aggregate from this rank's members' chunks (already in `layout`)."""
    return wrap(layout, chunks=[rows.get(d) for d in range(len(layout.members))])


def select_mask(x: AggregateTensor, mask: torch.Tensor) -> AggregateTensor:
    """Rows where `mask` ([rows] bool) holds, in order, re-striped evenly: each member selects among
    its own rows, then the selections are re-striped."""
    layout = x._layout
    m = x.members
    if is_agg(mask):
        mask = relayout(mask, layout)
    else:
        exchange.account_plain(mask, layout, True)
    if fusing(layout) and x._whole is not None and (not is_agg(mask) or mask._whole is not None):
        flat = mask._whole if is_agg(mask) else mask.to(x._whole.device)
        index = flat.nonzero().squeeze(1)
        counts = torch.searchsorted(index, torch.tensor(layout.bounds, device=index.device)).diff().tolist()
        out_layout = even_layout(index.shape[0], m)
        out = from_sources(list(enumerate(counts)), _split(x._whole.index_select(0, index), counts), out_layout, like_of(x))
        return keep_persistent(out, x)
    masks = mask.chunks if is_agg(mask) else exchange.rows_of(mask, layout)
    return keep_persistent(even_from_pieces(m, {d: x.chunks[d][masks[d]] for d in m.local}, like_of(x)), x)


def _split(rows: torch.Tensor, counts: Sequence[int]) -> Dict[int, torch.Tensor]:
    return dict(enumerate(torch.split(rows, list(counts))))


def spread(t: torch.Tensor, members) -> AggregateTensor:
    """An ordinary (replicated) result striped evenly: each member takes its rows, nothing moves."""
    return aggregate(t, members, persistent=False)
