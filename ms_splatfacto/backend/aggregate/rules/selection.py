"""Row selection (boolean mask, index tensor, `index_select`, `cat` along rows: a re-striped result),
`nonzero`, and row writes (`index_put_`, `index_add_`, `scatter*` along rows: each owner writes its
own rows)."""

from __future__ import annotations

from typing import Dict

import torch

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.dispatch import DECLINE, register, run_local
from ms_splatfacto.backend.aggregate.layout import even_layout
from ms_splatfacto.backend.aggregate.propagation import always, bind, call_args, is_agg, mutates_first, target_layout
from ms_splatfacto.backend.aggregate.redistribute import from_sources, like_of, relayout, select_mask, take_rows
from ms_splatfacto.backend.aggregate.rules.views import SCATTER_LOCAL
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, fusing, to_plain

aten = torch.ops.aten


@register(aten.index.Tensor)
def index(func, args, kwargs):
    x, indices = args[0], args[1]
    if not is_agg(x) or len(indices) != 1 or indices[0] is None or indices[0].dim() != 1:
        return DECLINE
    idx = indices[0]
    if idx.dtype in (torch.bool, torch.uint8):
        return select_mask(x, idx.bool()) if idx.shape[0] == x.shape[0] else DECLINE
    return take_rows(x, idx)


@register(aten.index_select.default)
def index_select(func, args, kwargs):
    x, dim, idx = args
    if not is_agg(x):
        return DECLINE
    if dim % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout)
    return take_rows(x, idx)


@register(aten.cat.default)
def cat(func, args, kwargs):
    """`cat` along rows: the inputs' rows in order, re-striped evenly (ordinary inputs are sent by
    member 0, which, like every rank, holds them); along other dims row-local."""
    bound = bind(func, args, kwargs)
    tensors = [t for t in bound["tensors"] if not (t.dim() == 1 and t.shape[0] == 0 and not is_agg(t))]
    aggs = [t for t in tensors if is_agg(t)]
    ndim = aggs[0].dim()
    if bound["dim"] % ndim != 0:
        return run_local(func, args, kwargs, target_layout(func, args, aggs), always)
    m = aggs[0].members
    sources, local = [], {}
    for t in tensors:
        pieces = [(d, n, t.chunks[d] if m.is_local(d) else None) for d, n in enumerate(t._layout.counts)] if is_agg(t) else [(0, t.shape[0], t)]
        for d, n, rows in pieces:
            if m.is_local(d):
                local[len(sources)] = rows.to(m.devices[d])
            sources.append((d, n))
    layout = even_layout(sum(n for _, n in sources), m)
    return from_sources(sources, local, layout, like_of(aggs[0]))


@register(aten.nonzero.default)
def nonzero(func, args, kwargs):
    """Global coordinates of non-zero entries ([K, ndim], ordinary, the same on every rank)."""
    x = args[0]
    layout, m = x._layout, x.members
    if fusing(layout) and x._whole is not None:
        out = x._whole.nonzero()
        counts = torch.bincount(layout.owners(out[:, 0]), minlength=len(m)).tolist() if x.dim() else []
        for d, n in enumerate(counts):
            exchange.record(d, 0, n * x.dim() * out.element_size())
        return out
    parts = {}
    for d in m.local:
        local = x.chunks[d].nonzero()
        local[:, 0] += layout.bounds[d]
        parts[d] = local
    return torch.cat(exchange.replicate(m, parts))


@register(aten.index_put_, aten._index_put_impl_, aten.index_put)
def index_put(func, args, kwargs):
    """`x[rows] = values` / `+=` (accumulate): each member writes the rows it owns."""
    b = bind(func, args, kwargs)
    x, indices, values = b["self"], b["indices"], b["values"]
    if not is_agg(x):
        return DECLINE
    if len(indices) != 1 or indices[0] is None or indices[0].dim() != 1:
        return DECLINE
    target = x if mutates_first(func) else x.clone()
    idx = indices[0]
    if idx.dtype in (torch.bool, torch.uint8):
        idx = (relayout(idx, x._layout) if is_agg(idx) else idx).bool().nonzero().squeeze(1)
    return scatter_rows(target, idx, values, bool(b.get("accumulate")))


@register(aten.index_add_, aten.index_add)
def index_add(func, args, kwargs):
    b = bind(func, args, kwargs)
    x = b["self"]
    if not is_agg(x):
        return DECLINE
    if b["dim"] % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout, always)
    target = x if mutates_first(func) else x.clone()
    source = b["source"] if b["alpha"] == 1 else b["source"] * b["alpha"]
    return scatter_rows(target, b["index"], source, True)


def scatter_rows(x: AggregateTensor, index: torch.Tensor, values: torch.Tensor, accumulate: bool) -> AggregateTensor:
    """Write (or add) `values` into rows `index` ([K] global) of `x`: `values` is [K, ...] (one row per
    index, aggregate or ordinary) or broadcast. Each owner finds its entries in the (replicated) index
    and reads their values from where they live; entries keep their order, so repeated rows
    accumulate as on one device."""
    layout, m = x._layout, x.members
    index = (to_plain(index) if is_agg(index) else index).to(m.device)
    index = torch.where(index < 0, index + layout.rows, index)
    per_row = values.dim() == x.dim() and values.shape[0] == index.shape[0] and index.shape[0] != 1
    if not per_row and is_agg(values):
        values = to_plain(values)
    owners = layout.owners(index)
    if fusing(layout) and x._whole is not None:
        counts = torch.bincount(owners, minlength=len(m)).tolist()
        for d, n in enumerate(counts):
            exchange.record(0, d, n * (index.element_size() + (exchange.row_bytes(values) if per_row else 0)))
        x._whole.index_put_((index,), to_plain(values).to(x._whole.device) if is_agg(values) else values, accumulate)
        return x
    entries: Dict[int, torch.Tensor] = {d: (owners == d).nonzero().squeeze(1) for d in m.local}
    for d in m.local:
        exchange.record(m.host, d, entries[d].numel() * index.element_size())
    if per_row and is_agg(values):
        picked = exchange.request_rows(m, entries, values._layout, values.chunks)
    elif per_row:
        for d in m.local:
            exchange.record(m.host, d, entries[d].numel() * exchange.row_bytes(values))
        picked = {d: values[entries[d]] for d in m.local}
    else:
        picked = {d: values for d in m.local}
    for d in m.local:
        sel = entries[d]
        if sel.numel():
            local = exchange.to_member(index[sel] - layout.bounds[d], d, layout)
            x.chunks[d].index_put_((local,), exchange.to_member(picked[d], d, layout), accumulate)
    return x


@register(aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce, aten.scatter_reduce_)
def scatter(func, args, kwargs):
    """`scatter*` along rows (the backward of sorts and top-k): the index ([K, ...], global row
    numbers) and source are replicated and each member applies the elements aimed at its rows, the
    others sent to a spare row that is dropped. Along other dims row-local."""
    b = bind(func, args, kwargs)
    x, dim = b["self"], b["dim"]
    if not is_agg(x) or not isinstance(dim, int) or dim % x.dim() != 0:
        return SCATTER_LOCAL(func, args, kwargs)
    layout, m = x._layout, x.members
    index = (to_plain(b["index"]) if is_agg(b["index"]) else b["index"]).to(m.device)
    src = b.get("src", b.get("value"))
    src = to_plain(src) if is_agg(src) else src
    owners = layout.owners(index)
    per_element = index.element_size() + (src.element_size() if torch.is_tensor(src) else 0)
    target = x if mutates_first(func) else x.clone()
    for d in m.local:
        chunk = target.chunks[d]
        exchange.record(m.host, d, int((owners == d).sum()) * per_element)
        n = layout.counts[d]
        spare = torch.cat([chunk, chunk.new_zeros((1, *chunk.shape[1:]))])
        local = torch.where(owners == d, index - layout.bounds[d], n)
        bound = dict(b, self=spare, dim=0, index=exchange.to_member(local, d, layout))
        if torch.is_tensor(src):
            bound["src"] = exchange.to_member(src, d, layout)
        call, call_kwargs = call_args(func, bound)
        out = func(*call, **call_kwargs)
        chunk.copy_(out[:n])
    return target
