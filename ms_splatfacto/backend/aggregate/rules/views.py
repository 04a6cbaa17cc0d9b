"""Views, shape changes, copies, factories and matrix products: row-local where the rows stay the
leading dim and each row's elements its own; a result whose leading dim is no longer the rows is an
ordinary (replicated) tensor computed on gathered operands."""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_flatten

from ms_splatfacto.backend.aggregate.dispatch import DECLINE, register, run_local
from ms_splatfacto.backend.aggregate.layout import even_layout
from ms_splatfacto.backend.aggregate.propagation import always, bind, is_agg, never, norm_dims, target_layout
from ms_splatfacto.backend.aggregate.redistribute import gathered, keep_persistent, like_of, plain_result
from ms_splatfacto.backend.aggregate.rules.reductions import reduce_rows
from ms_splatfacto.backend.aggregate.tensor import fusing, to_plain, wrap

aten = torch.ops.aten


def _dim_rule(dim_arg, extra: int = 0, rowed=never, reduce: bool = False):
    """A rule for ops with a dim argument: row-local when the row dim (0) is not among the dims, a
    row reduction when it is and the op is one (`reduce`), else declined. `extra` counts dims the op
    adds (unsqueeze, stack)."""

    def rule(func, args, kwargs):
        bound = bind(func, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
        x = next(t for t in tensors if is_agg(t))
        dims = norm_dims(bound.get(dim_arg) if dim_arg else None, x.dim() + extra)
        if 0 not in dims:
            aggs = [t for t in tensors if is_agg(t)]
            return run_local(func, args, kwargs, target_layout(func, args, aggs), rowed)
        if reduce and x is bound["self"]:
            return reduce_rows(func, args, kwargs, x, dims)
        return DECLINE

    return rule


for _ops, _arg, _extra, _rowed, _reduce in [
    ((aten.squeeze.dim, aten.squeeze.dims), "dim", 0, never, False),
    ((aten.split, aten.split_with_sizes, aten.unbind), "dim", 0, never, False),
    ((aten._softmax, aten._log_softmax), "dim", 0, never, False),
    ((aten._softmax_backward_data, aten._log_softmax_backward_data), "dim", 0, always, False),
    ((aten.gather,), "dim", 0, always, False),
    ((aten.stack,), "dim", 1, always, False),
    ((aten.max.dim, aten.min.dim, aten.argmax, aten.argmin, aten.logsumexp, aten.var, aten.std), "dim", 0, never, False),
    ((aten.count_nonzero,), "dim", 0, never, False),
    ((aten.sum, aten.mean, aten.amax, aten.amin, aten.prod, aten.any, aten.all), "dim", 0, never, True),
    ((aten.max.default, aten.min.default), None, 0, never, True),
    ((aten.linalg_vector_norm,), "dim", 0, never, True),
]:
    register(*_ops)(_dim_rule(_arg, _extra, _rowed, _reduce))

SCATTER_LOCAL = _dim_rule("dim", 0, always, False)
"""`scatter*` along non-row dims (registered with the row case in `selection.py`)."""


@register(aten.transpose.int)
def transpose(func, args, kwargs):
    x, d0, d1 = args[0], args[1] % max(args[0].dim(), 1), args[2] % max(args[0].dim(), 1)
    if 0 in (d0, d1) and d0 != d1:
        return gathered(func, args, kwargs)
    return run_local(func, args, kwargs, x._layout)


@register(aten.permute)
def permute(func, args, kwargs):
    x, dims = args[0], args[1]
    if x.dim() and dims[0] % x.dim() != 0:
        return gathered(func, args, kwargs)
    return run_local(func, args, kwargs, x._layout)


@register(aten.t)
def t(func, args, kwargs):
    return run_local(func, args, kwargs, args[0]._layout) if args[0].dim() < 2 else gathered(func, args, kwargs)


@register(aten.unsqueeze)
def unsqueeze(func, args, kwargs):
    x, dim = args[0], args[1] % (args[0].dim() + 1)
    return run_local(func, args, kwargs, x._layout) if dim != 0 else gathered(func, args, kwargs)


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
    if not is_agg(x) or x.dim() == 0 or len(size) == 0:
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
    """A view of a one-row aggregate that drops the row dim: an ordinary tensor from the owner's row
    (a view of it where the owner is on this rank's device, else a copy sent to every rank)."""
    x = args[0]
    if x.shape[0] != 1:
        return DECLINE
    owner = x._layout.counts.index(1)
    m = x.members
    if m.world_size == 1 and x.chunks[owner].device == m.device:
        return func(x.chunks[owner], *args[1:], **kwargs)
    row = plain_result(m, owner, x.chunks[owner] if m.is_local(owner) else None, like_of(x))
    return func(row, *args[1:], **kwargs)


@register(aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
def matmul(func, args, kwargs):
    """Matrix products whose row operand is an aggregate (the other factor ordinary, e.g. a rotation,
    or per-row batches for bmm): row-local."""
    bound = bind(func, args, kwargs)
    batched = "batch1" in bound or func.overloadpacket is aten.bmm
    first = bound.get("mat1", bound.get("batch1", bound["self"]))
    second = bound.get("mat2", bound.get("batch2"))
    carriers = [first, second, bound["self"]] if batched else [first, bound["self"]]
    aggs = [t for t in carriers if is_agg(t)]
    if not aggs or (is_agg(second) and not batched):
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
    out = run_local(func, args, kwargs, x._layout)
    return keep_persistent(out, x) if func.overloadpacket in _STATE_FACTORIES else out


_STATE_FACTORIES = {aten.clone, aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like}
"""Copies and factories of model state are model state (the Adam moments torch.optim makes with
`zeros_like`); views (detach, alias) share its storage already, conversions are computations."""


@register(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided)
def new_factory(func, args, kwargs):
    """`new_*` of an aggregate makes a tensor on the aggregate device: striped evenly over its first
    dim (0-dim results are ordinary)."""
    x, size = args[0], list(args[1])
    device = kwargs.get("device")
    first = x.chunks[x.members.local[0]]
    if device is not None and not x.members.holds(device):
        return func(first, *args[1:], **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    if len(size) == 0:
        return func(first, *args[1:], **kwargs)
    layout = even_layout(size[0], x.members)
    if fusing(layout) and x._whole is not None:
        return keep_persistent(wrap(layout, whole=func(x._whole, *args[1:], **kwargs)), x)
    return keep_persistent(wrap(layout, chunks=[
        func(x.chunks[d], [n, *size[1:]], *args[2:], **kwargs) if x.members.is_local(d) else None
        for d, n in enumerate(layout.counts)
    ]), x)  # statistics made after a parameter (`new_zeros`) are state too


@register(aten.select.int)
def select(func, args, kwargs):
    """A row of an aggregate is an ordinary tensor, sent by its owner to every rank."""
    x, dim, i = args
    if dim % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout)
    i = i % x.shape[0]
    layout, m = x._layout, x.members
    d = int(layout.owners(torch.tensor([i]))[0])
    if m.world_size == 1:
        return x.chunks[d].select(0, i - layout.bounds[d])
    local = x.chunks[d][i - layout.bounds[d] : i - layout.bounds[d] + 1] if m.is_local(d) else None
    return plain_result(m, d, local, like_of(x))[0]


@register(aten.slice.Tensor)
def slice_rows(func, args, kwargs):
    """A row slice is a view: each member keeps its own rows of the range (layout possibly uneven)."""
    b = bind(func, args, kwargs)
    x = b["self"]
    if b["dim"] % x.dim() != 0:
        return run_local(func, args, kwargs, x._layout)
    if b["step"] != 1:
        return DECLINE
    start, stop, _ = slice(b["start"], b["end"]).indices(x.shape[0])
    stop = max(start, stop)
    layout = x._layout.sliced(start, stop)
    if x._whole is not None:
        first, last = x._layout.local_span
        lo, hi = min(max(start, first), last) - first, min(max(stop, first), last) - first
        return wrap(layout, x._whole[lo:hi])
    chunks = [
        c[min(max(start - lo, 0), c.shape[0]) : min(max(stop - lo, 0), c.shape[0])] if c is not None else None
        for c, lo in zip(x.chunks, x._layout.bounds)
    ]
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


@register(aten._local_scalar_dense, aten.equal, aten.allclose)
def python_value(func, args, kwargs):
    """Ops whose answer is a Python value: computed on gathered data, the same on every rank."""
    return gathered(func, args, kwargs)


@register(aten.is_same_size)
def is_same_size(func, args, kwargs):
    return args[0].shape == args[1].shape
