"""The op-rule registry of the aggregate tensor (op overload -> rule), after DTensor's.

Families, one rule each:
- row-local ops (pointwise, `_foreach_`, views and reductions along non-row dims, factories, matmul by
  an ordinary matrix): run once per member on its rows, result in the same layout;
- reductions over rows: per-member partials combined on member 0, result ordinary;
- row selection (boolean mask, index tensor, `index_select`, `cat` along rows): a re-striped result;
- row writes (`index_put_`, `index_add_`): each member writes the rows it owns.
An op without a rule (or whose rule declines the arguments) takes `fallback`: gather, compute on
member 0, re-stripe; counted per op name and logged once.

Ordinary tensor arguments are "rowed" when they carry the rows (same row count, row dim leading):
each member reads its rows of them; other ordinary tensors (a camera matrix, a scalar) are read whole.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout, even_layout
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, fusing, to_plain, wrap

aten = torch.ops.aten
log = logging.getLogger(__name__)

Rule = Callable[[Any, tuple, dict], Any]
DECLINE = object()
"""Returned by a rule for arguments it does not cover; the op then takes the fallback."""

_RULES: Dict[Any, Optional[Rule]] = {}
_FALLBACKS: Counter = Counter()


def register(*ops) -> Callable[[Rule], Rule]:
    """Register a rule for op overloads, or for every overload of an op packet."""

    def decorate(rule: Rule) -> Rule:
        for op in ops:
            overloads = [getattr(op, name) for name in op.overloads()] if hasattr(op, "overloads") else [op]
            for overload in overloads:
                _RULES[overload] = rule
        return rule

    return decorate


def rule_for(func) -> Optional[Rule]:
    """The registered rule, else the family rule the op's tags or name imply (cached), else None."""
    if func not in _RULES:
        if func.name().startswith("aten::_foreach_"):
            _RULES[func] = foreach
        elif torch.Tag.pointwise in func.tags:
            _RULES[func] = pointwise
        elif torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            _RULES[func] = decompose
        else:
            _RULES[func] = None
    return _RULES[func]


def dispatch(func, args: tuple, kwargs: dict):
    rule = rule_for(func)
    if rule is not None:
        out = rule(func, args, kwargs)
        if out is not DECLINE:
            return out
    return fallback(func, args, kwargs)


def decompose(func, args, kwargs):
    """Composite ops reached from inside a rule (below autograd): run their decomposition."""
    return func.decompose(*args, **kwargs)


def fallback_counts() -> Dict[str, int]:
    """How often each op took the fallback path since the last reset."""
    return dict(_FALLBACKS)


def reset_fallback_counts() -> None:
    _FALLBACKS.clear()


def has_rule(func) -> bool:
    return rule_for(func) is not None


# ---------------------------------------------------------------------------------------------------
# helpers


def _is_agg(x: object) -> bool:
    return isinstance(x, AggregateTensor)


def _bind(func, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """Argument name -> value (defaults filled in) from the op's schema."""
    out = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _mutates_first(func) -> bool:
    first = func._schema.arguments[0] if func._schema.arguments else None
    return first is not None and first.alias_info is not None and first.alias_info.is_write


def _norm_dims(dim, ndim: int) -> Tuple[int, ...]:
    """Dims as non-negative ints; None or [] mean all dims."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return tuple(d % max(ndim, 1) for d in dims)


def _target_layout(func, args: tuple, aggs: Sequence[AggregateTensor]) -> Layout:
    """The layout results take: the mutated argument's, else the first even one, else the first."""
    if _mutates_first(func) and args and _is_agg(args[0]):
        return args[0]._layout
    for a in aggs:
        if a._layout.is_even:
            return a._layout
    return aggs[0]._layout


def relayout(x: AggregateTensor, layout: Layout) -> AggregateTensor:
    """`x` laid out as `layout` (a re-stripe through the exchange when it differs)."""
    if x._layout == layout:
        return x
    whole, chunks = exchange.assemble(list(enumerate(x.chunks)), layout, fusing(layout))
    return wrap(layout, whole, chunks)


def _restripe(pieces: Sequence[Tuple[int, torch.Tensor]], members) -> AggregateTensor:
    """A new even aggregate from rows [(source member, rows)] in global order."""
    layout = even_layout(sum(t.shape[0] for _, t in pieces), members)
    whole, chunks = exchange.assemble(pieces, layout, fusing(layout))
    return wrap(layout, whole, chunks)


def _always(t: torch.Tensor, layout: Layout) -> bool:
    return t.dim() > 0 and t.shape[0] == layout.rows


def _never(t: torch.Tensor, layout: Layout) -> bool:
    return False


def run_local(
    func,
    args: tuple,
    kwargs: dict,
    layout: Layout,
    rowed: Callable[[torch.Tensor, Layout], bool] = _never,
    sized: Optional[int] = None,
):
    """Run a row-local op once per member on its rows and return results in `layout`.

    Aggregate arguments are brought to `layout`; ordinary tensors for which `rowed` holds are cut into
    the members' rows, others are read whole. `sized` is the position of a size argument whose first
    entry is the row count (view, expand, new_zeros), rewritten per member. Where `layout` allows
    fusing, the members' launches are one launch over the contiguous storage."""
    flat, spec = tree_flatten((args, kwargs))
    flat = [relayout(a, layout) if _is_agg(a) else a for a in flat]
    is_rowed = [torch.is_tensor(a) and not _is_agg(a) and rowed(a, layout) for a in flat]
    for a, r in zip(flat, is_rowed):
        if torch.is_tensor(a) and not _is_agg(a):
            exchange.account_plain(a, layout, r)
    if fusing(layout) and all(a._whole is not None for a in flat if _is_agg(a)):
        local_args, local_kwargs = tree_unflatten([a._whole if _is_agg(a) else a for a in flat], spec)
        return _finish(func, args, [func(*local_args, **local_kwargs)], layout, fused=True)
    cut = {i: exchange.rows_of(a, layout) for i, a in enumerate(flat) if is_rowed[i]}
    outs = []
    for d in range(len(layout.members)):
        local = [a.chunks[d] if _is_agg(a) else cut[i][d] if i in cut else exchange.to_member(a, d, layout) for i, a in enumerate(flat)]
        local_args, local_kwargs = tree_unflatten(local, spec)
        if sized is not None:
            size = list(local_args[sized])
            size[0] = layout.counts[d]
            local_args = (*local_args[:sized], size, *local_args[sized + 1 :])
        outs.append(func(*local_args, **local_kwargs))
    return _finish(func, args, outs, layout, fused=False)


def _finish(func, args: tuple, outs: List[Any], layout: Layout, fused: bool):
    """Wrap per-member outputs (one entry, on the whole storage, when fused) into aggregates."""
    if _mutates_first(func) and args and _is_agg(args[0]):
        return args[0]
    leaves = [tree_flatten(o)[0] for o in outs]
    spec = tree_flatten(outs[0])[1]
    wrapped = []
    for i, t in enumerate(leaves[0]):
        if not torch.is_tensor(t):
            wrapped.append(t)
        elif fused:
            wrapped.append(wrap(layout, whole=t))
        else:
            wrapped.append(wrap(layout, chunks=[lv[i] for lv in leaves]))
    return tree_unflatten(wrapped, spec)


def _call(func, bound: Dict[str, Any]) -> Tuple[tuple, dict]:
    """Positional and keyword-only arguments for calling `func` from a name -> value binding."""
    args, kwargs = [], {}
    for a in func._schema.arguments:
        if a.kwarg_only:
            kwargs[a.name] = bound[a.name]
        else:
            args.append(bound[a.name])
    return tuple(args), kwargs


def _gathered(func, args: tuple, kwargs: dict):
    """Run `func` on ordinary tensors: aggregates gathered onto member 0 (through the exchange)."""
    return func(*tree_map(lambda a: to_plain(a) if _is_agg(a) else a, args), **tree_map(lambda a: to_plain(a) if _is_agg(a) else a, kwargs))


# ---------------------------------------------------------------------------------------------------
# row-local families


def pointwise(func, args, kwargs):
    """Elementwise ops (and copy_/fill_/zero_): every member computes its rows; ordinary tensors
    broadcast as usual, or contribute their rows when they carry the row dim."""
    flat = tree_flatten((args, kwargs))[0]
    aggs = [a for a in flat if _is_agg(a)]
    if _mutates_first(func) and args and not _is_agg(args[0]):
        _gathered(func, args, kwargs)
        return args[0]
    ndim = max(t.dim() for t in flat if torch.is_tensor(t))
    layout = _target_layout(func, args, aggs)
    if any(a.dim() != ndim or a.shape[0] != layout.rows for a in aggs):
        return DECLINE if _mutates_first(func) else rows_leave_dim0(func, args, kwargs)

    def rowed(t, lay):
        return t.dim() == ndim and t.shape[0] == lay.rows and lay.rows != 1

    return run_local(func, args, kwargs, layout, rowed)


def foreach(func, args, kwargs):
    """`_foreach_` ops: the entries holding an aggregate run row-locally, grouped by layout so each
    member makes one multi-tensor launch per group; the other entries run as they are."""
    bound = _bind(func, args, kwargs)
    names = [a.name for a in func._schema.arguments]
    length = len(bound[names[0]])
    lists = [n for n in names if isinstance(bound[n], (list, tuple)) and len(bound[n]) == length]
    groups: Dict[Optional[Layout], List[int]] = {}
    for i in range(length):
        aggs = [bound[n][i] for n in lists if _is_agg(bound[n][i])]
        groups.setdefault(aggs[0]._layout if aggs else None, []).append(i)
    results: List[Any] = [None] * length
    returns = False
    for layout, idx in groups.items():
        sub = dict(bound)
        for n in lists:
            sub[n] = [bound[n][i] for i in idx]
        sub_args, sub_kwargs = _call(func, sub)
        if layout is None:
            out = func(*sub_args, **sub_kwargs)
        else:
            out = run_local(func, sub_args, sub_kwargs, layout, lambda t, lay: t.dim() > 0)
            out = None if _mutates_first(func) else out
        if out is not None:
            returns = True
            for i, o in zip(idx, out):
                results[i] = o
    return results if returns else None


def _dim_rule(dim_arg: str, extra: int = 0, rowed=_never, reduce: bool = False):
    """A rule for ops with a dim argument: row-local when the row dim (0) is not among the dims, a
    row reduction when it is and the op is one (`reduce`), else declined. `extra` counts dims the op
    adds (unsqueeze, stack)."""

    def rule(func, args, kwargs):
        bound = _bind(func, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
        x = next(t for t in tensors if _is_agg(t))
        dims = _norm_dims(bound.get(dim_arg) if dim_arg else None, x.dim() + extra)
        if 0 not in dims:
            aggs = [t for t in tensors if _is_agg(t)]
            return run_local(func, args, kwargs, _target_layout(func, args, aggs), rowed)
        if reduce and x is bound["self"]:
            return reduce_rows(func, args, kwargs, x, dims)
        return DECLINE

    return rule


for _ops, _arg, _extra, _rowed, _reduce in [
    ((aten.squeeze.dim, aten.squeeze.dims), "dim", 0, _never, False),
    ((aten.split, aten.split_with_sizes, aten.unbind), "dim", 0, _never, False),
    ((aten._softmax, aten._log_softmax), "dim", 0, _never, False),
    ((aten._softmax_backward_data, aten._log_softmax_backward_data), "dim", 0, _always, False),
    ((aten.gather, aten.scatter, aten.scatter_add, aten.scatter_reduce), "dim", 0, _always, False),
    ((aten.stack,), "dim", 1, _always, False),
    ((aten.max.dim, aten.min.dim, aten.argmax, aten.argmin, aten.logsumexp, aten.var, aten.std), "dim", 0, _never, False),
    ((aten.count_nonzero,), "dim", 0, _never, False),
    ((aten.sum, aten.mean, aten.amax, aten.amin, aten.prod, aten.any, aten.all), "dim", 0, _never, True),
    ((aten.max.default, aten.min.default), None, 0, _never, True),
    ((aten.linalg_vector_norm,), "dim", 0, _never, True),
]:
    register(*_ops)(_dim_rule(_arg, _extra, _rowed, _reduce))


def rows_leave_dim0(func, args, kwargs):
    """A result whose dim 0 is no longer the rows (a transpose moving the rows, a new leading dim, a
    broadcast against leading dims) cannot be striped by rows: it is an ordinary tensor on member 0,
    computed on operands gathered through the exchange (counted)."""
    return _gathered(func, args, kwargs)


@register(aten.transpose.int)
def transpose(func, args, kwargs):
    x, d0, d1 = args[0], args[1] % max(args[0].dim(), 1), args[2] % max(args[0].dim(), 1)
    if 0 in (d0, d1) and d0 != d1:
        return rows_leave_dim0(func, args, kwargs)
    return run_local(func, args, kwargs, x._layout)


@register(aten.permute)
def permute(func, args, kwargs):
    x, dims = args[0], args[1]
    if x.dim() and dims[0] % x.dim() != 0:
        return rows_leave_dim0(func, args, kwargs)
    return run_local(func, args, kwargs, x._layout)


@register(aten.t)
def t(func, args, kwargs):
    return run_local(func, args, kwargs, args[0]._layout) if args[0].dim() < 2 else rows_leave_dim0(func, args, kwargs)


@register(aten.unsqueeze)
def unsqueeze(func, args, kwargs):
    x, dim = args[0], args[1] % (args[0].dim() + 1)
    return run_local(func, args, kwargs, x._layout) if dim != 0 else rows_leave_dim0(func, args, kwargs)


@register(aten.squeeze.default)
def squeeze(func, args, kwargs):
    x = args[0]
    return run_local(func, args, kwargs, x._layout) if x.shape[0] != 1 else single_row_view(func, args, kwargs)


@register(aten.repeat)
def repeat(func, args, kwargs):
    x, reps = args[0], args[1]
    return run_local(func, args, kwargs, x._layout) if len(reps) == x.dim() and reps[0] == 1 else DECLINE


@register(aten.view.default, aten._unsafe_view.default, aten.expand.default, aten.reshape.default)
def resize(func, args, kwargs):
    """view/expand keeping the row dim first and each row's elements its own."""
    x, size = args[0], list(args[1])
    if not _is_agg(x) or x.dim() == 0 or len(size) == 0:
        return DECLINE
    rest = math.prod(x.shape[1:])
    if func is aten.expand.default:
        ok = len(size) == x.dim() and size[0] in (-1, x.shape[0])
    else:
        rows = size[0] if size[0] != -1 else (x.numel() // max(math.prod(size[1:]), 1))
        ok = rows == x.shape[0] and (rows == 0 or math.prod(s for s in size[1:]) == rest or -1 in size[1:])
    if ok:
        return run_local(func, args, kwargs, x._layout, sized=1)
    return single_row_view(func, args, kwargs)


def single_row_view(func, args, kwargs):
    """A view of a one-row aggregate that drops the row dim: an ordinary view of the owner's row."""
    x = args[0]
    if x.shape[0] != 1:
        return DECLINE
    return func(x.chunks[x._layout.counts.index(1)], *args[1:], **kwargs)


@register(aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
def matmul(func, args, kwargs):
    """Matrix products whose row operand is an aggregate (the other factor ordinary, e.g. a rotation,
    or per-row batches for bmm): row-local."""
    bound = _bind(func, args, kwargs)
    batched = "batch1" in bound or func.overloadpacket is aten.bmm
    first = bound.get("mat1", bound.get("batch1", bound["self"]))
    second = bound.get("mat2", bound.get("batch2"))
    carriers = [first, second, bound["self"]] if batched else [first, bound["self"]]
    aggs = [t for t in carriers if _is_agg(t)]
    if not aggs or (_is_agg(second) and not batched):
        return DECLINE
    ndim = aggs[0].dim()

    def rowed(t, lay):
        same_rows = t.dim() == ndim and t.shape[0] == lay.rows
        return any(t is c for c in carriers) and same_rows and (batched or lay.rows != 1)

    return run_local(func, args, kwargs, aggs[0]._layout, rowed)


@register(
    aten.detach, aten.alias, aten.clone, aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like,
    aten.rand_like, aten.randn_like, aten._to_copy,
)
def like(func, args, kwargs):
    """Same-shape results (copies, conversions, `*_like` factories) stay in the layout; a device that
    is not a member (e.g. `.cpu()` of a CUDA aggregate) gives an ordinary tensor."""
    x = args[0]
    device = kwargs.get("device")
    if device is not None and not x.members.holds(device):
        return func(to_plain(x), *args[1:], **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    return run_local(func, args, kwargs, x._layout)


@register(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided)
def new_factory(func, args, kwargs):
    """`new_*` of an aggregate makes a tensor on the aggregate device: striped evenly over its first
    dim (0-dim results are ordinary)."""
    x, size = args[0], list(args[1])
    device = kwargs.get("device")
    if device is not None and not x.members.holds(device):
        return func(x.chunks[0], *args[1:], **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    if len(size) == 0:
        return func(x.chunks[0], *args[1:], **kwargs)
    layout = even_layout(size[0], x.members)
    if fusing(layout) and x._whole is not None:
        return wrap(layout, whole=func(x._whole, *args[1:], **kwargs))
    return wrap(layout, chunks=[func(x.chunks[d], [n, *size[1:]], *args[2:], **kwargs) for d, n in enumerate(layout.counts)])


register(aten.copy_, aten.fill_, aten.zero_, aten.masked_fill, aten.masked_fill_)(pointwise)


# ---------------------------------------------------------------------------------------------------
# reductions over rows

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


def reduce_rows(func, args: tuple, kwargs: dict, x: AggregateTensor, dims: Tuple[int, ...]):
    """A reduction whose dims include the rows: partials on each member holding rows, brought to
    member 0 and combined. The result is an ordinary tensor on member 0's device."""
    partial, combine = _COMBINE[func.overloadpacket]
    bound = _bind(func, args, kwargs)
    keepdim = bool(bound.get("keepdim", False))
    layout = x._layout
    holders = [d for d, n in enumerate(layout.counts) if n] or [0]
    if fusing(layout) and x._whole is not None:
        out = func(*[x._whole if a is x else a for a in args], **kwargs)
        for d in holders:
            exchange.record(d, 0, out.numel() * out.element_size())
        return out
    partials = exchange.reduce_to_first([(d, partial(x.chunks[d], dims, bound)) for d in holders], layout)
    count = math.prod(x.shape[d] for d in dims)
    out = combine(torch.cat(partials, 0), bound, count)
    return out if keepdim else out.squeeze(dims)


# ---------------------------------------------------------------------------------------------------
# row selection, row writes


def _index_on_first(index: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A plain long row index [K] on member 0 (a gather of an aggregate index)."""
    plain = to_plain(index) if _is_agg(index) else index
    return plain.to(layout.members.device)


def take_rows(x: AggregateTensor, index: torch.Tensor) -> AggregateTensor:
    """Rows `index` ([K] long) of `x`, re-striped evenly."""
    index = _index_on_first(index, x._layout)
    out_layout = even_layout(index.shape[0], x.members)
    fused = fusing(out_layout) and x._whole is not None
    whole, chunks = exchange.take(x.chunks, x._layout, index, out_layout, x._whole if fused else None)
    return wrap(out_layout, whole, chunks)


def select_mask(x: AggregateTensor, mask: torch.Tensor) -> AggregateTensor:
    """Rows where `mask` ([rows] bool) holds, in order, re-striped evenly: each member selects among
    its own rows, then the selections are re-striped."""
    layout = x._layout
    if _is_agg(mask):
        mask = relayout(mask, layout)
    else:
        exchange.account_plain(mask, layout, True)
    if fusing(layout) and x._whole is not None and (not _is_agg(mask) or mask._whole is not None):
        flat = mask._whole if _is_agg(mask) else mask
        index = flat.nonzero().squeeze(1)
        counts = torch.searchsorted(index, torch.tensor(layout.bounds, device=index.device)).diff().tolist()
        out_layout = even_layout(index.shape[0], x.members)
        exchange.account_pieces(list(enumerate(counts)), out_layout, exchange.row_bytes(x))
        whole = x._whole.index_select(0, index)
        return wrap(out_layout, whole)
    masks = mask.chunks if _is_agg(mask) else exchange.rows_of(mask, layout)
    return _restripe([(d, c[m]) for d, (c, m) in enumerate(zip(x.chunks, masks))], x.members)


@register(aten.index.Tensor)
def index(func, args, kwargs):
    x, indices = args[0], args[1]
    if not _is_agg(x) or len(indices) != 1 or indices[0] is None or indices[0].dim() != 1:
        return DECLINE
    idx = indices[0]
    if idx.dtype in (torch.bool, torch.uint8):
        return select_mask(x, idx.bool()) if idx.shape[0] == x.shape[0] else DECLINE
    return take_rows(x, idx)


@register(aten.index_select.default)
def index_select(func, args, kwargs):
    x, dim, idx = args
    if not _is_agg(x):
        return DECLINE
    if dim % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout)
    return take_rows(x, idx)


@register(aten.cat.default)
def cat(func, args, kwargs):
    """`cat` along rows: the inputs' rows in order, re-striped evenly (ordinary inputs count as held
    by member 0); along other dims row-local."""
    bound = _bind(func, args, kwargs)
    tensors = [t for t in bound["tensors"] if not (t.dim() == 1 and t.shape[0] == 0 and not _is_agg(t))]
    aggs = [t for t in tensors if _is_agg(t)]
    ndim = aggs[0].dim()
    if bound["dim"] % ndim != 0:
        return run_local(func, args, kwargs, _target_layout(func, args, aggs), _always)
    pieces = [(d, c) for t in tensors for d, c in (enumerate(t.chunks) if _is_agg(t) else [(0, t)])]
    layout = even_layout(sum(t.shape[0] for t in tensors), aggs[0].members)
    if fusing(layout) and all(t._whole is not None for t in aggs):
        exchange.account_pieces([(s, c.shape[0]) for s, c in pieces], layout, exchange.row_bytes(aggs[0]))
        return wrap(layout, torch.cat([t._whole if _is_agg(t) else t for t in tensors]))
    return _restripe(pieces, aggs[0].members)


@register(aten.select.int)
def select(func, args, kwargs):
    x, dim, i = args
    if dim % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout)
    i = i % x.shape[0]
    d = int(x._layout.owners(torch.tensor([i]))[0])
    return x.chunks[d].select(0, i - x._layout.bounds[d])


@register(aten.slice.Tensor)
def slice_rows(func, args, kwargs):
    """A row slice is a view: each member keeps its own rows of the range (layout possibly uneven)."""
    b = _bind(func, args, kwargs)
    x = b["self"]
    if b["dim"] % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout)
    if b["step"] != 1:
        return DECLINE
    start, stop, _ = slice(b["start"], b["end"]).indices(x.shape[0])
    stop = max(start, stop)
    layout = x._layout.sliced(start, stop)
    if x._whole is not None:
        return wrap(layout, x._whole[start:stop])
    chunks = [c[min(max(start - lo, 0), c.shape[0]) : min(max(stop - lo, 0), c.shape[0])] for c, lo in zip(x.chunks, x._layout.bounds)]
    return wrap(layout, chunks=chunks)


@register(aten.slice_backward.default, aten.select_backward.default)
def view_backward(func, args, kwargs):
    """Backward of a view along non-row dims is row-local; of a row slice, a zero-filled aggregate
    with the gradient copied into the slice."""
    grad, sizes, dim = args[:3]
    if dim % len(sizes) != 0:
        return run_local(func, args, kwargs, grad._layout, sized=1)
    if func is aten.select_backward.default or args[5] != 1:
        return DECLINE
    out = grad.new_zeros(sizes)
    out[args[3] : args[4]].copy_(grad)
    return out


@register(aten.nonzero.default)
def nonzero(func, args, kwargs):
    """Global coordinates of non-zero entries ([K, ndim], ordinary, on member 0)."""
    x = args[0]
    layout = x._layout
    if fusing(layout) and x._whole is not None:
        out = x._whole.nonzero()
        counts = torch.bincount(layout.owners(out[:, 0]), minlength=len(layout.members)).tolist() if x.dim() else []
        for d, n in enumerate(counts):
            exchange.record(d, 0, n * x.dim() * out.element_size())
        return out
    parts = []
    for d, c in enumerate(x.chunks):
        local = c.nonzero()
        local[:, 0] += layout.bounds[d]
        parts.append(exchange.move(local, d, 0, layout))
    return torch.cat(parts)


@register(aten.index_put_, aten._index_put_impl_, aten.index_put)
def index_put(func, args, kwargs):
    """`x[rows] = values` / `+=` (accumulate): each member writes the rows it owns."""
    b = _bind(func, args, kwargs)
    x, indices, values = b["self"], b["indices"], b["values"]
    if not _is_agg(x):
        return DECLINE
    if len(indices) != 1 or indices[0] is None or indices[0].dim() != 1:
        return DECLINE
    target = x if _mutates_first(func) else x.clone()
    idx = indices[0]
    if idx.dtype in (torch.bool, torch.uint8):
        idx = (relayout(idx, x._layout) if _is_agg(idx) else idx).bool().nonzero().squeeze(1)
    return scatter_rows(target, _index_on_first(idx, x._layout), values, bool(b.get("accumulate")))


@register(aten.index_add_, aten.index_add)
def index_add(func, args, kwargs):
    b = _bind(func, args, kwargs)
    x = b["self"]
    if not _is_agg(x):
        return DECLINE
    if b["dim"] % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout, _always)
    target = x if _mutates_first(func) else x.clone()
    source = b["source"] if b["alpha"] == 1 else b["source"] * b["alpha"]
    return scatter_rows(target, _index_on_first(b["index"], x._layout), source, True)


def scatter_rows(x: AggregateTensor, index: torch.Tensor, values: torch.Tensor, accumulate: bool) -> AggregateTensor:
    """Write (or add) `values` into rows `index` ([K] global, on member 0) of `x`: `values` is [K, ...]
    (one row per index) or broadcast."""
    layout = x._layout
    index = torch.where(index < 0, index + layout.rows, index)
    per_row = values.dim() == x.dim() and values.shape[0] == index.shape[0] and index.shape[0] != 1
    values = to_plain(values) if _is_agg(values) else values
    owners = layout.owners(index)
    counts = torch.bincount(owners, minlength=len(layout.members)).tolist()
    for d, n in enumerate(counts):
        exchange.record(0, d, n * (index.element_size() + (exchange.row_bytes(values) if per_row else 0)))
    if fusing(layout) and x._whole is not None:
        x._whole.index_put_((index,), values, accumulate)
        return x
    for d, chunk in enumerate(x.chunks):
        sel = (owners == d).nonzero().squeeze(1)
        if sel.numel():
            v = values[sel] if per_row else values
            local = exchange.to_member(index[sel] - layout.bounds[d], d, layout)
            chunk.index_put_((local,), exchange.to_member(v, d, layout), accumulate)
    return x


# ---------------------------------------------------------------------------------------------------
# flips, scans, sorts and searches along rows


def _members_with_rows(layout: Layout) -> List[int]:
    return [d for d, n in enumerate(layout.counts) if n]


def _account_merge(layout: Layout, out_layout: Layout, bytes_per_row: int) -> None:
    """Count a merge on member 0: every member's rows travel there, the result is re-striped."""
    exchange.account_pieces(list(enumerate(layout.counts)), exchange.even_to_first(layout), bytes_per_row)
    exchange.account_pieces([(0, out_layout.rows)], out_layout, bytes_per_row)


def _from_first(t: torch.Tensor, members) -> AggregateTensor:
    """A plain result on member 0 ([rows, ...]) re-striped evenly (counted)."""
    return _restripe([(0, t)], members)


@register(aten.flip)
def flip(func, args, kwargs):
    """Flipping the rows is a re-stripe: each member flips its own rows (and any other dims asked),
    then the members' pieces, last member first, are dealt out evenly."""
    x, dims = args[0], _norm_dims(args[1], args[0].dim())
    if 0 not in dims:
        return run_local(func, args, kwargs, x._layout)
    layout = x._layout
    out_layout = even_layout(layout.rows, x.members)
    if fusing(out_layout) and x._whole is not None:
        exchange.account_pieces([(d, layout.counts[d]) for d in reversed(range(len(layout.counts)))], out_layout, exchange.row_bytes(x))
        return wrap(out_layout, whole=x._whole.flip(dims))
    return _restripe([(d, x.chunks[d].flip(dims)) for d in reversed(range(len(layout.counts)))], x.members)


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
    """Scans along rows: each member scans its own rows, the members' totals go to member 0, which
    forms every member's carry (the combined totals of the members before it) and sends it back; the
    member combines its scan with its carry. In-place scans write the result back. Along other dims
    the scan is row-local."""
    b = _bind(func, args, kwargs)
    x, dim = b["self"], b["dim"]
    if not isinstance(dim, int):
        return DECLINE
    if dim % max(x.dim(), 1) != 0:
        return run_local(func, args, kwargs, x._layout)
    packet = func.overloadpacket
    if packet in (aten.cumsum_, aten.cumprod_):
        out = scan(getattr(aten, packet.__name__[:-1]).default, (x, dim), {"dtype": b.get("dtype")})
        return x.copy_(out)
    layout = x._layout
    holders = _members_with_rows(layout)
    if fusing(layout) and x._whole is not None:
        out = func(x._whole, *args[1:], **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        per_row = exchange.row_bytes(first) * (2 if isinstance(out, tuple) else 1)
        for d in holders[1:]:
            exchange.record(d, 0, per_row)
            exchange.record(0, d, per_row)
        return tuple(wrap(layout, whole=o) for o in out) if isinstance(out, tuple) else wrap(layout, whole=out)
    extreme = packet in (aten.cummax, aten.cummin)
    local = {d: func(x.chunks[d], *args[1:], **kwargs) for d in range(len(layout.counts))}
    totals = exchange.reduce_to_first([(d, local[d][0][-1:] if extreme else local[d][-1:]) for d in holders], layout)
    if extreme:
        index_totals = exchange.reduce_to_first([(d, local[d][1][-1:] + layout.bounds[d]) for d in holders], layout)
    carry, carry_index, values, indices = None, None, [], []
    for i, d in enumerate(holders):
        mine, here = local[d], layout.members.devices[d]
        if carry is None:
            values.append(mine[0] if extreme else mine)
            indices.append(mine[1] + layout.bounds[d] if extreme else None)
        elif extreme:
            c, ci = exchange.move(carry, 0, d, layout), exchange.move(carry_index, 0, d, layout)
            take = _later_wins(mine[0], c, packet)
            values.append(torch.where(take, mine[0], c))
            indices.append(torch.where(take, mine[1] + layout.bounds[d], ci))
        else:
            values.append(_SCANS[packet][1](mine, exchange.move(carry, 0, d, layout)))
        if extreme and carry is None:
            carry, carry_index = totals[i], index_totals[i]
        elif extreme:
            take = _later_wins(totals[i], carry, packet)
            carry, carry_index = torch.where(take, totals[i], carry), torch.where(take, index_totals[i], carry_index)
        else:
            carry = _SCANS[packet][0](carry, totals[i])
    empty = {d: (local[d][0] if extreme else local[d]) for d in range(len(layout.counts)) if d not in holders}
    chunks = [values[holders.index(d)] if d in holders else empty[d] for d in range(len(layout.counts))]
    if not extreme:
        return wrap(layout, chunks=chunks)
    index_chunks = [indices[holders.index(d)] if d in holders else local[d][1] for d in range(len(layout.counts))]
    return wrap(layout, chunks=chunks), wrap(layout, chunks=index_chunks)


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


@register(aten.sort.default, aten.sort.stable)
def sort(func, args, kwargs):
    """Sorting along rows: each member sorts its own rows (stably), member 0 merges the sorted pieces
    (`_merge_sorted`, stable, so the result equals a stable sort of all rows) and re-stripes values
    and global row indices evenly. Along other dims row-local."""
    b = _bind(func, args, kwargs)
    x, dim, descending = b["self"], b["dim"], bool(b["descending"])
    if dim % max(x.dim(), 1) != 0:
        return run_local(func, args, kwargs, x._layout)
    if x.is_complex():
        return DECLINE
    layout = x._layout
    out_layout = even_layout(layout.rows, x.members)
    if fusing(out_layout) and x._whole is not None:
        values, indices = torch.sort(x._whole, dim=0, descending=descending, stable=True)
        _account_merge(layout, out_layout, exchange.row_bytes(values) + exchange.row_bytes(indices))
        return wrap(out_layout, whole=values), wrap(out_layout, whole=indices)
    pieces = []
    for d in _members_with_rows(layout):
        v, i = torch.sort(x.chunks[d], dim=0, descending=descending, stable=True)
        pieces.append((exchange.move(v, d, 0, layout), exchange.move(i + layout.bounds[d], d, 0, layout)))
    if not pieces:
        v, i = torch.sort(x.chunks[0], dim=0, descending=descending, stable=True)
        pieces.append((v, i))
    values, indices = _merge_sorted(pieces, descending)
    return _from_first(values, x.members), _from_first(indices, x.members)


@register(aten.topk.default)
def topk(func, args, kwargs):
    """The k largest (smallest) rows: each member's own top min(k, its rows) go to member 0, which
    takes the top k of those candidates; values and global row indices are re-striped evenly."""
    b = _bind(func, args, kwargs)
    x, k, dim = b["self"], b["k"], b["dim"]
    if dim % max(x.dim(), 1) != 0:
        return run_local(func, args, kwargs, x._layout)
    layout = x._layout
    out_layout = even_layout(k, x.members)
    if fusing(out_layout) and x._whole is not None:
        values, indices = func(x._whole, *args[1:], **kwargs)
        _account_merge(even_layout(sum(min(k, n) for n in layout.counts), x.members), out_layout,
                       exchange.row_bytes(values) + exchange.row_bytes(indices))
        return wrap(out_layout, whole=values), wrap(out_layout, whole=indices)
    rest = dict(largest=b["largest"], sorted=True)
    cands, cand_index = [], []
    for d in _members_with_rows(layout) or [0]:
        v, i = torch.topk(x.chunks[d], min(k, layout.counts[d]), dim=0, **rest)
        cands.append(exchange.move(v, d, 0, layout))
        cand_index.append(exchange.move(i + layout.bounds[d], d, 0, layout))
    values, pick = torch.topk(torch.cat(cands), k, dim=0, largest=b["largest"], sorted=b["sorted"])
    indices = torch.cat(cand_index).gather(0, pick)
    return _from_first(values, x.members), _from_first(indices, x.members)


_SCATTER_LOCAL = _dim_rule("dim", 0, _always, False)


@register(aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce, aten.scatter_reduce_)
def scatter(func, args, kwargs):
    """`scatter*` along rows (the backward of sorts and top-k): the index ([K, ...], global row
    numbers) and source are read on member 0 and each member applies the elements aimed at its rows,
    the others sent to a spare row that is dropped. Along other dims row-local."""
    b = _bind(func, args, kwargs)
    x, dim = b["self"], b["dim"]
    if not _is_agg(x) or not isinstance(dim, int) or dim % x.dim() != 0:
        return _SCATTER_LOCAL(func, args, kwargs)
    layout = x._layout
    index = _index_on_first(b["index"], layout)
    src = b.get("src", b.get("value"))
    src = to_plain(src) if _is_agg(src) else src
    owners = layout.owners(index)
    per_element = index.element_size() + (src.element_size() if torch.is_tensor(src) else 0)
    for d, count in enumerate(torch.bincount(owners.flatten(), minlength=len(layout.counts)).tolist()):
        exchange.record(0, d, count * per_element)
    target = x if _mutates_first(func) else x.clone()
    for d, chunk in enumerate(target.chunks):
        n = layout.counts[d]
        spare = torch.cat([chunk, chunk.new_zeros((1, *chunk.shape[1:]))])
        local = torch.where(owners == d, index - layout.bounds[d], n)
        bound = dict(b, self=spare, dim=0, index=exchange.to_member(local, d, layout))
        if torch.is_tensor(src):
            bound["src"] = exchange.to_member(src, d, layout)
        call_args, call_kwargs = _call(func, bound)
        out = func(*call_args, **call_kwargs)
        chunk.copy_(out[:n])
    return target


def _split_search(x: AggregateTensor, search: Callable[[torch.Tensor, Any], torch.Tensor], values):
    """Searches in a sorted 1-D aggregate `x`: the position of a value among all rows is the sum of
    its positions in each member's rows, so every member searches its rows for all `values` and
    member 0 adds the partial positions."""
    layout = x._layout
    plain = to_plain(values) if _is_agg(values) else values
    if torch.is_tensor(plain):
        exchange.account_plain(plain, layout, False)
    partials = [(d, search(x.chunks[d], exchange.to_member(plain, d, layout))) for d in _members_with_rows(layout) or [0]]
    out = torch.stack(exchange.reduce_to_first(partials, layout)).sum(0).to(partials[0][1].dtype)
    if _is_agg(values):
        whole, chunks = exchange.assemble([(0, out)], values._layout, fusing(values._layout))
        return wrap(values._layout, whole, chunks)
    return out


@register(aten.searchsorted.Tensor, aten.searchsorted.Scalar)
def searchsorted(func, args, kwargs):
    """`searchsorted(sorted_sequence, values)`: row-local where the rows are batches (values searched
    in their own row, or an ordinary 1-D sequence read by every member); a 1-D aggregate sequence
    is searched by `_split_search`."""
    b = _bind(func, args, kwargs)
    seq, values = b["sorted_sequence"], b["self"]
    if b.get("sorter") is not None:
        return DECLINE
    options = {k: b[k] for k in ("out_int32", "right", "side")}
    if _is_agg(seq) and seq.dim() == 1:
        return _split_search(seq, lambda chunk, v: torch.searchsorted(chunk, v, **options), values)
    lead = seq if _is_agg(seq) and seq.dim() > 1 else values if _is_agg(values) else None
    if lead is None or not torch.is_tensor(values) or values.dim() == 0:
        return DECLINE
    return run_local(func, args, kwargs, lead._layout, lambda t, lay: t is not seq or t.dim() > 1)


@register(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize(func, args, kwargs):
    """`bucketize(input, boundaries)`: row-local for an aggregate input (every member reads the
    ordinary boundaries); aggregate boundaries are searched by `_split_search`."""
    b = _bind(func, args, kwargs)
    values, boundaries = b["self"], b["boundaries"]
    options = {k: b[k] for k in ("out_int32", "right")}
    if _is_agg(boundaries):
        return _split_search(boundaries, lambda chunk, v: torch.bucketize(v, chunk, **options), values)
    return run_local(func, args, kwargs, values._layout)


@register(aten._unique2.default)
def unique(func, args, kwargs):
    """`torch.unique` (sorted): each member finds its own unique values and counts, member 0 merges
    them into the global sorted unique values (and adds counts), re-striped evenly; the inverse index
    is row-local, each member looking its values up in the global unique values."""
    b = _bind(func, args, kwargs)
    x = b["self"]
    if not b["sorted"] or (x.is_floating_point() and bool(torch.isnan(x).any())):
        return DECLINE
    layout = x._layout
    holders = _members_with_rows(layout) or [0]
    local = [(d, torch.unique(x.chunks[d], sorted=True, return_counts=True)) for d in holders]
    uniques = exchange.reduce_to_first([(d, u) for d, (u, _) in local], layout)
    counts = exchange.reduce_to_first([(d, c) for d, (_, c) in local], layout)
    merged = torch.unique(torch.cat(uniques), sorted=True)
    total = torch.zeros(merged.shape[0], dtype=torch.long, device=merged.device)
    for u, c in zip(uniques, counts):
        total.index_add_(0, torch.searchsorted(merged, u), c)
    nothing = torch.empty(0, dtype=torch.long, device=layout.members.device)
    inverse = nothing
    if b["return_inverse"]:
        exchange.account_plain(merged, layout, False)
        pieces = [torch.searchsorted(exchange.to_member(merged, d, layout), c.flatten()).view(c.shape) for d, c in enumerate(x.chunks)]
        inverse = wrap(layout, chunks=pieces)
    out_counts = _from_first(total, x.members) if b["return_counts"] else nothing
    return _from_first(merged, x.members), inverse, out_counts


# ---------------------------------------------------------------------------------------------------
# conversions and queries


@register(aten._local_scalar_dense, aten.equal, aten.allclose)
def gathered(func, args, kwargs):
    """Ops whose answer is a Python value: computed on gathered data."""
    return _gathered(func, args, kwargs)


@register(aten.is_same_size)
def is_same_size(func, args, kwargs):
    return args[0].shape == args[1].shape


# ---------------------------------------------------------------------------------------------------
# fallback


def fallback(func, args, kwargs):
    """The one path for ops without a rule: gather every aggregate onto member 0, compute there,
    write mutated aggregates back and re-stripe tensor results. Counted and logged once per op."""
    name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
    if name not in _FALLBACKS:
        log.warning("aggregate tensor: no rule for %s; gathering to one member (slow)", func)
    _FALLBACKS[name] += 1
    flat, spec = tree_flatten((args, kwargs))
    plain = [to_plain(a) if _is_agg(a) else a for a in flat]
    p_args, p_kwargs = tree_unflatten(plain, spec)
    out = func(*p_args, **p_kwargs)
    members = next(a for a in flat if _is_agg(a)).members
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write and i < len(args) and _is_agg(args[i]):
            args[i].copy_(p_args[i])
    if _mutates_first(func) and _is_agg(args[0]):
        return args[0]
    return tree_map(lambda t: _restripe([(0, t)], members) if torch.is_tensor(t) and t.dim() > 0 else t, out)
