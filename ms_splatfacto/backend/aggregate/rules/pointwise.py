"""Pointwise and `_foreach_` ops: every member computes its own rows."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten

from ms_splatfacto.backend.aggregate.dispatch import DECLINE, register, register_family, run_local
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.propagation import bind, call_args, is_agg, mutates_first, target_layout
from ms_splatfacto.backend.aggregate.redistribute import gathered

aten = torch.ops.aten


def pointwise(func, args, kwargs):
    """Elementwise ops (and copy_/fill_/zero_): every member computes its rows; ordinary tensors
    broadcast as usual, or contribute their rows when they carry the row dim."""
    flat = tree_flatten((args, kwargs))[0]
    aggs = [a for a in flat if is_agg(a)]
    if mutates_first(func) and args and not is_agg(args[0]):
        gathered(func, args, kwargs)
        return args[0]
    ndim = max(t.dim() for t in flat if torch.is_tensor(t))
    layout = target_layout(func, args, aggs)
    if any(a.dim() != ndim or a.shape[0] != layout.rows for a in aggs):
        return DECLINE if mutates_first(func) else gathered(func, args, kwargs)

    def rowed(t, lay):
        return t.dim() == ndim and t.shape[0] == lay.rows and lay.rows != 1

    return run_local(func, args, kwargs, layout, rowed)


def foreach(func, args, kwargs):
    """`_foreach_` ops: the entries holding an aggregate run row-locally, grouped by layout so each
    member makes one multi-tensor launch per group; the other entries run as they are."""
    bound = bind(func, args, kwargs)
    names = [a.name for a in func._schema.arguments]
    length = len(bound[names[0]])
    lists = [n for n in names if isinstance(bound[n], (list, tuple)) and len(bound[n]) == length]
    groups: Dict[Optional[Layout], List[int]] = {}
    for i in range(length):
        aggs = [bound[n][i] for n in lists if is_agg(bound[n][i])]
        groups.setdefault(aggs[0]._layout if aggs else None, []).append(i)
    results: List[Any] = [None] * length
    returns = False
    for layout, idx in groups.items():
        sub = dict(bound)
        for n in lists:
            sub[n] = [bound[n][i] for i in idx]
        sub_args, sub_kwargs = call_args(func, sub)
        if layout is None:
            out = func(*sub_args, **sub_kwargs)
        else:
            out = run_local(func, sub_args, sub_kwargs, layout, lambda t, lay: t.dim() > 0)
            out = None if mutates_first(func) else out
        if out is not None:
            returns = True
            for i, o in zip(idx, out):
                results[i] = o
    return results if returns else None


register_family("pointwise", pointwise)
register_family("foreach", foreach)
register(aten.copy_, aten.fill_, aten.zero_, aten.masked_fill, aten.masked_fill_)(pointwise)
