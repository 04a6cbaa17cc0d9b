"""Flips, sorts, top-k, searches and `unique` along the rows. Sorts and top-k merge the members'
sorted pieces on member 0 and re-stripe the result evenly; searches in a sorted aggregate add the
members' partial positions."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.dispatch import DECLINE, register, run_local
from ms_splatfacto.backend.aggregate.layout import Layout, even_layout
from ms_splatfacto.backend.aggregate.propagation import bind, is_agg, members_with_rows, norm_dims
from ms_splatfacto.backend.aggregate.redistribute import from_member, from_sources, gather_to, like_of, plain_result, spread
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, fusing, to_plain, wrap

aten = torch.ops.aten


def _account_merge(layout: Layout, out_layout: Layout, bytes_per_row: int) -> None:
    """Count a merge on member 0 done in place: every member's rows travel there, the result is
    re-striped."""
    for d, n in enumerate(layout.counts):
        exchange.record(d, 0, n * bytes_per_row)
    for d, n in enumerate(out_layout.counts):
        exchange.record(0, d, n * bytes_per_row)


@register(aten.flip)
def flip(func, args, kwargs):
    """Flipping the rows is a re-stripe: each member flips its own rows (and any other dims asked),
    then the members' pieces, last member first, are dealt out evenly."""
    x, dims = args[0], norm_dims(args[1], args[0].dim())
    if 0 not in dims:
        return run_local(func, args, kwargs, x._layout)
    layout, m = x._layout, x.members
    out_layout = even_layout(layout.rows, m)
    order = list(reversed(range(len(layout.counts))))
    if fusing(out_layout) and x._whole is not None:
        exchange.restripe_counts([(d, layout.counts[d]) for d in order], out_layout, exchange.row_bytes(x))
        return wrap(out_layout, whole=x._whole.flip(dims))
    sources = [(d, layout.counts[d]) for d in order]
    local = {i: x.chunks[d].flip(dims) for i, d in enumerate(order) if m.is_local(d)}
    return from_sources(sources, local, out_layout, like_of(x))


def _rank_keys(t: torch.Tensor) -> torch.Tensor:
    """Sort keys as a [cols, rows] tensor searchsorted can batch over (bool keys as bytes)."""
    t = t.reshape(t.shape[0], math.prod(t.shape[1:])).t().contiguous()
    return t.to(torch.uint8) if t.dtype == torch.bool else t


def _merge_sorted(pieces: Sequence[Tuple[torch.Tensor, torch.Tensor]], descending: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stable merge of per-member sorted (values, global indices) pieces ([n_d, ...] each, in
    member order, on one device): each element's final row is its row in its piece plus how many
    elements of every other piece precede it (ties: earlier members first)."""
    values = torch.cat([v for v, _ in pieces])
    indices = torch.cat([i for _, i in pieces])
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        merged, order = torch.sort(values, dim=0, descending=descending, stable=True)
        return merged, indices.gather(0, order)
    keys = [_rank_keys(v) for v, _ in pieces]
    ascending = [k.flip(-1) if descending else k for k in keys]
    out_values = torch.empty((values.shape[0], *values.shape[1:]), dtype=values.dtype, device=values.device)
    cols = math.prod(values.shape[1:])
    flat_values = out_values.view(values.shape[0], cols).t()
    flat_indices = torch.empty_like(indices).view(indices.shape[0], cols).t()
    for d, (k, (v, i)) in enumerate(zip(keys, pieces)):
        rank = torch.arange(k.shape[1], device=k.device).expand(cols, -1).clone()
        for e, seq in enumerate(ascending):
            if e == d or seq.shape[1] == 0:
                continue
            before = e < d
            if descending:
                rank += seq.shape[1] - torch.searchsorted(seq, k, right=not before)
            else:
                rank += torch.searchsorted(seq, k, right=before)
        flat_values.scatter_(1, rank, v.reshape(v.shape[0], cols).t())
        flat_indices.scatter_(1, rank, i.reshape(i.shape[0], cols).t())
    return out_values, flat_indices.t().reshape(indices.shape)


def _merged_on_first(x: AggregateTensor, local_sorted: Callable[[int], Tuple[torch.Tensor, torch.Tensor]], rows: Sequence[int]):
    """Each member's (values, global indices) piece sent to member 0 ([rows[d], ...] each, in member
    order): the pieces there, None on other ranks."""
    m = x.members
    values, indices = {}, {}
    for d in m.local:
        v, i = local_sorted(d)
        values[d], indices[d] = v, i
    got_v = gather_to(m, 0, values, rows)
    got_i = gather_to(m, 0, indices, rows)
    if got_v is None:
        return None
    return [(v, i) for v, i, n in zip(got_v, got_i, rows) if n] or [(got_v[0], got_i[0])]


@register(aten.sort.default, aten.sort.stable)
def sort(func, args, kwargs):
    """Sorting along rows: each member sorts its own rows (stably), member 0 merges the sorted pieces
    (`_merge_sorted`, stable, so the result equals a stable sort of all rows) and re-stripes values
    and global row indices evenly. Along other dims row-local."""
    b = bind(func, args, kwargs)
    x, dim, descending = b["self"], b["dim"], bool(b["descending"])
    if dim % max(x.dim(), 1) != 0:
        return run_local(func, args, kwargs, x._layout)
    if x.is_complex():
        return DECLINE
    layout, m = x._layout, x.members
    out_layout = even_layout(layout.rows, m)
    if fusing(out_layout) and x._whole is not None:
        values, indices = torch.sort(x._whole, dim=0, descending=descending, stable=True)
        _account_merge(layout, out_layout, exchange.row_bytes(values) + exchange.row_bytes(indices))
        return wrap(out_layout, whole=values), wrap(out_layout, whole=indices)

    def local_sorted(d):  # d: a local member
        v, i = torch.sort(x.chunks[d], dim=0, descending=descending, stable=True)
        return v, i + layout.bounds[d]

    pieces = _merged_on_first(x, local_sorted, layout.counts)
    merged = _merge_sorted(pieces, descending) if pieces is not None else (None, None)
    index_like = (tuple(x.shape[1:]), torch.long)
    return from_member(m, 0, merged[0], layout.rows, like_of(x)), from_member(m, 0, merged[1], layout.rows, index_like)


@register(aten.topk.default)
def topk(func, args, kwargs):
    """The k largest (smallest) rows: each member's own top min(k, its rows) go to member 0, which
    takes the top k of those candidates; values and global row indices are re-striped evenly."""
    b = bind(func, args, kwargs)
    x, k, dim = b["self"], b["k"], b["dim"]
    if dim % max(x.dim(), 1) != 0:
        return run_local(func, args, kwargs, x._layout)
    layout, m = x._layout, x.members
    out_layout = even_layout(k, m)
    if fusing(out_layout) and x._whole is not None:
        values, indices = func(x._whole, *args[1:], **kwargs)
        _account_merge(even_layout(sum(min(k, n) for n in layout.counts), m), out_layout,
                       exchange.row_bytes(values) + exchange.row_bytes(indices))
        return wrap(out_layout, whole=values), wrap(out_layout, whole=indices)
    rows = [min(k, n) for n in layout.counts]

    def local_top(d):  # d: a local member
        v, i = torch.topk(x.chunks[d], rows[d], dim=0, largest=b["largest"], sorted=True)
        return v, i + layout.bounds[d]

    pieces = _merged_on_first(x, local_top, rows)
    values = indices = None
    if pieces is not None:
        values, pick = torch.topk(torch.cat([v for v, _ in pieces]), k, dim=0, largest=b["largest"], sorted=b["sorted"])
        indices = torch.cat([i for _, i in pieces]).gather(0, pick)
    index_like = (tuple(x.shape[1:]), torch.long)
    return from_member(m, 0, values, k, like_of(x)), from_member(m, 0, indices, k, index_like)


def _split_search(x: AggregateTensor, search: Callable[[torch.Tensor, Any], torch.Tensor], values):
    """Searches in a sorted 1-D aggregate `x`: the position of a value among all rows is the sum of
    its positions in each member's rows, so every member searches its rows for all `values` and the
    partial positions are added in member order on every rank."""
    layout, m = x._layout, x.members
    plain = to_plain(values) if is_agg(values) else values
    if torch.is_tensor(plain):
        exchange.account_plain(plain, layout, False)
    holders = members_with_rows(layout) or [0]
    parts = {}
    for d in m.local:
        found = search(x.chunks[d], exchange.to_member(plain, d, layout))
        parts[d] = found[None] if d in holders else found[None][:0]
    got = exchange.replicate(m, parts, rows_per_member=[1 if d in holders else 0 for d in range(len(m))])
    out = torch.cat([got[d] for d in holders]).sum(0).to(got[holders[0]].dtype)
    return spread(out, values.members) if is_agg(values) else out


@register(aten.searchsorted.Tensor, aten.searchsorted.Scalar)
def searchsorted(func, args, kwargs):
    """`searchsorted(sorted_sequence, values)`: row-local where the rows are batches (values searched
    in their own row, or an ordinary 1-D sequence read by every member); a 1-D aggregate sequence
    is searched by `_split_search`."""
    b = bind(func, args, kwargs)
    seq, values = b["sorted_sequence"], b["self"]
    if b.get("sorter") is not None:
        return DECLINE
    options = {k: b[k] for k in ("out_int32", "right", "side")}
    if is_agg(seq) and seq.dim() == 1:
        return _split_search(seq, lambda chunk, v: torch.searchsorted(chunk, v, **options), values)
    lead = seq if is_agg(seq) and seq.dim() > 1 else values if is_agg(values) else None
    if lead is None or not torch.is_tensor(values) or values.dim() == 0:
        return DECLINE
    return run_local(func, args, kwargs, lead._layout, lambda t, lay: t is not seq or t.dim() > 1)


@register(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize(func, args, kwargs):
    """`bucketize(input, boundaries)`: row-local for an aggregate input (every member reads the
    ordinary boundaries); aggregate boundaries are searched by `_split_search`."""
    b = bind(func, args, kwargs)
    values, boundaries = b["self"], b["boundaries"]
    options = {k: b[k] for k in ("out_int32", "right")}
    if is_agg(boundaries):
        return _split_search(boundaries, lambda chunk, v: torch.bucketize(v, chunk, **options), values)
    return run_local(func, args, kwargs, values._layout)


@register(aten._unique2.default)
def unique(func, args, kwargs):
    """`torch.unique` (sorted): each member finds its own unique values and counts, member 0 merges
    them into the global sorted unique values (and adds counts), sent to every rank and striped
    evenly; the inverse index is row-local, each member looking its values up in them."""
    b = bind(func, args, kwargs)
    x = b["self"]
    if not b["sorted"] or (x.is_floating_point() and bool(torch.isnan(x).any())):
        return DECLINE
    layout, m = x._layout, x.members
    holders = members_with_rows(layout) or [0]
    local = {d: torch.unique(x.chunks[d], sorted=True, return_counts=True) for d in m.local}
    rows = exchange.member_counts(m, {d: local[d][0].shape[0] if d in holders else 0 for d in m.local})
    uniques = gather_to(m, 0, {d: local[d][0] for d in m.local}, rows)
    counts = gather_to(m, 0, {d: local[d][1] for d in m.local}, rows)
    merged = total = None
    if uniques is not None:
        merged = torch.unique(torch.cat(uniques), sorted=True)
        total = torch.zeros(merged.shape[0], dtype=torch.long, device=merged.device)
        for u, c in zip(uniques, counts):
            total.index_add_(0, torch.searchsorted(merged, u), c)
    merged = plain_result(m, 0, merged, ((), x.dtype))
    total = plain_result(m, 0, total, ((), torch.long))
    nothing = torch.empty(0, dtype=torch.long, device=m.device)
    inverse = nothing
    if b["return_inverse"]:
        exchange.account_plain(merged, layout, False)
        pieces = [
            torch.searchsorted(exchange.to_member(merged, d, layout), c.flatten()).view(c.shape) if c is not None else None
            for d, c in enumerate(x.chunks)
        ]
        inverse = wrap(layout, chunks=pieces)
    out_counts = spread(total, m) if b["return_counts"] else nothing
    return spread(merged, m), inverse, out_counts
