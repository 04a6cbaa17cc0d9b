"""Reductions and scans along the rows: each member works on its own rows, the members' partials (or
totals) are replicated to every rank and combined there in member order, so every rank, and one
process with the same members, gets the same bits."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.dispatch import DECLINE, register, run_local
from ms_splatfacto.backend.aggregate.propagation import bind, members_with_rows
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, fusing, wrap

aten = torch.ops.aten

_COMBINE: Dict[Any, Tuple[Callable, Callable]] = {}


def _reduction(packet, partial: Callable, combine: Callable) -> None:
    _COMBINE[packet] = (partial, combine)


_reduction(aten.sum, lambda c, dims, b: torch.sum(c, dims, keepdim=True, dtype=b.get("dtype")), lambda p, b, n: p.sum(0, keepdim=True))
_reduction(aten.mean, lambda c, dims, b: torch.sum(c, dims, keepdim=True, dtype=b.get("dtype")), lambda p, b, n: p.sum(0, keepdim=True) / n)
_reduction(aten.amax, lambda c, dims, b: torch.amax(c, dims, keepdim=True), lambda p, b, n: p.amax(0, keepdim=True))
_reduction(aten.max, lambda c, dims, b: torch.amax(c, dims, keepdim=True), lambda p, b, n: p.amax(0, keepdim=True))
_reduction(aten.amin, lambda c, dims, b: torch.amin(c, dims, keepdim=True), lambda p, b, n: p.amin(0, keepdim=True))
_reduction(aten.min, lambda c, dims, b: torch.amin(c, dims, keepdim=True), lambda p, b, n: p.amin(0, keepdim=True))
_reduction(aten.any, lambda c, dims, b: torch.any(c, dims, keepdim=True), lambda p, b, n: p.any(0, keepdim=True))
_reduction(aten.all, lambda c, dims, b: torch.all(c, dims, keepdim=True), lambda p, b, n: p.all(0, keepdim=True))


def _prod_partial(c, dims, b):
    for d in dims:
        c = c.prod(d, keepdim=True, dtype=b.get("dtype"))
    return c


_reduction(aten.prod, _prod_partial, lambda p, b, n: p.prod(0, keepdim=True))


def _norm_combine(p, b, n):
    """Norm of per-member norms is the norm (any order but 0, whose partial counts add)."""
    order = b.get("ord", 2)
    return p.sum(0, keepdim=True) if order == 0 else torch.linalg.vector_norm(p, order, 0, keepdim=True)


_reduction(aten.linalg_vector_norm, lambda c, dims, b: torch.linalg.vector_norm(c, b.get("ord", 2), dims, keepdim=True, dtype=b.get("dtype")), _norm_combine)


def per_member_values(x: AggregateTensor, compute: Callable[[int], torch.Tensor], holders: List[int]) -> List[torch.Tensor]:
    """`compute(d)` ([1, ...]) for every member in `holders`, in member order, on every rank."""
    m = x.members
    parts = {d: compute(d) if d in holders else compute(d)[:0] for d in m.local}
    rows = [1 if d in holders else 0 for d in range(len(m))]
    got = exchange.replicate(m, parts, rows_per_member=rows)
    return [got[d] for d in holders]


def reduce_rows(func, args: tuple, kwargs: dict, x: AggregateTensor, dims: Tuple[int, ...]):
    """A reduction whose dims include the rows: partials on each member holding rows, combined in
    member order on every rank. The result is an ordinary (replicated) tensor."""
    partial, combine = _COMBINE[func.overloadpacket]
    bound = bind(func, args, kwargs)
    keepdim = bool(bound.get("keepdim", False))
    layout = x._layout
    holders = members_with_rows(layout) or [0]
    if fusing(layout) and x._whole is not None:
        out = func(*[x._whole if a is x else a for a in args], **kwargs)
        for d in holders:
            exchange.record(d, 0, out.numel() * out.element_size())
        return out
    partials = per_member_values(x, lambda d: partial(_padded(x, d, holders), dims, bound), holders)
    count = math.prod(x.shape[d] for d in dims)
    out = combine(torch.cat(partials, 0), bound, count)
    return out if keepdim else out.squeeze(dims)


def _padded(x: AggregateTensor, d: int, holders: List[int]) -> torch.Tensor:
    """Local member d's rows; a member without rows computing only a partial's shape gets one zero row."""
    chunk = x.chunks[d]
    return chunk if d in holders else chunk.new_zeros((1, *chunk.shape[1:]))


def _carry_add(carry, total):
    return total if carry is None else carry + total


def _carry_mul(carry, total):
    return total if carry is None else carry * total


def _carry_logaddexp(carry, total):
    return total if carry is None else torch.logaddexp(carry, total)


_SCANS: Dict[Any, Tuple[Callable, Callable]] = {
    aten.cumsum: (_carry_add, lambda local, carry: local + carry),
    aten.cumprod: (_carry_mul, lambda local, carry: local * carry),
    aten.logcumsumexp: (_carry_logaddexp, torch.logaddexp),
}


def _later_wins(local: torch.Tensor, carry: torch.Tensor, packet) -> torch.Tensor:
    """Where the running extreme comes from this member's rows: ties and NaN go to the later row, as
    torch's cummax/cummin do."""
    better = local >= carry if packet is aten.cummax else local <= carry
    return better | torch.isnan(local) if local.is_floating_point() else better


@register(aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default, aten.cummax.default, aten.cummin.default,
          aten.cumsum_.default, aten.cumprod_.default)
def scan(func, args, kwargs):
    """Scans along rows: each member scans its own rows, the members' totals are replicated to every
    rank, each member forms its carry (the combined totals of the members before it) and combines its
    scan with it. In-place scans write the result back. Along other dims the scan is row-local."""
    b = bind(func, args, kwargs)
    x, dim = b["self"], b["dim"]
    if not isinstance(dim, int):
        return DECLINE
    if dim % max(x.dim(), 1) != 0:
        return run_local(func, args, kwargs, x._layout)
    packet = func.overloadpacket
    if packet in (aten.cumsum_, aten.cumprod_):
        out = scan(getattr(aten, packet.__name__[:-1]).default, (x, dim), {"dtype": b.get("dtype")})
        return x.copy_(out)
    layout, m = x._layout, x.members
    holders = members_with_rows(layout)
    if fusing(layout) and x._whole is not None:
        out = func(x._whole, *args[1:], **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        per_row = exchange.row_bytes(first) * (2 if isinstance(out, tuple) else 1)
        for d in holders[1:]:
            exchange.record(d, 0, per_row)
            exchange.record(0, d, per_row)
        return tuple(wrap(layout, whole=o) for o in out) if isinstance(out, tuple) else wrap(layout, whole=out)
    extreme = packet in (aten.cummax, aten.cummin)
    local = {d: func(x.chunks[d], *args[1:], **kwargs) for d in m.local}
    value_of = (lambda d: local[d][0]) if extreme else (lambda d: local[d])
    totals = per_member_values(x, lambda d: value_of(d)[-1:] if d in holders else value_of(d)[:1], holders) if holders else []
    if extreme:
        index_totals = per_member_values(
            x, lambda d: (local[d][1][-1:] + layout.bounds[d]) if d in holders else local[d][1][:1], holders
        ) if holders else []
    carry, carry_index = None, None
    values: Dict[int, torch.Tensor] = {}
    indices: Dict[int, torch.Tensor] = {}
    for i, d in enumerate(holders):
        if m.is_local(d):
            mine, here = local[d], m.devices[d]
            if carry is None:
                values[d] = value_of(d)
                indices[d] = mine[1] + layout.bounds[d] if extreme else None
            elif extreme:
                exchange.record(m.host, d, exchange.nbytes(carry) + exchange.nbytes(carry_index))
                c, ci = exchange.to_member(carry, d, layout), exchange.to_member(carry_index, d, layout)
                take = _later_wins(mine[0], c.to(here), packet)
                values[d] = torch.where(take, mine[0], c.to(here))
                indices[d] = torch.where(take, mine[1] + layout.bounds[d], ci.to(here))
            else:
                exchange.record(m.host, d, exchange.nbytes(carry))
                values[d] = _SCANS[packet][1](mine, carry.to(here))
        if extreme and carry is None:
            carry, carry_index = totals[i], index_totals[i]
        elif extreme:
            take = _later_wins(totals[i], carry, packet)
            carry, carry_index = torch.where(take, totals[i], carry), torch.where(take, index_totals[i], carry_index)
        else:
            carry = _SCANS[packet][0](carry, totals[i])
    chunks = [values.get(d, value_of(d)) if m.is_local(d) else None for d in range(len(m))]
    if not extreme:
        return wrap(layout, chunks=chunks)
    index_chunks = [indices.get(d, local[d][1]) if m.is_local(d) else None for d in range(len(m))]
    return wrap(layout, chunks=chunks), wrap(layout, chunks=index_chunks)
