"""How ops run (after DTensor's `_dispatch.py`): the op-rule registry, the row-local executor every
family builds on, and the counted fallback.

Families (`rules/`), one rule each: row-local ops (pointwise, `_foreach_`, views and reductions along
non-row dims, factories, matmul by an ordinary matrix) run once per member on its rows; reductions over
rows combine per-member partials; row selection and `cat` re-stripe; row writes go to the owners. An op
without a rule (or whose rule declines the arguments) takes `fallback`: every rank gathers the
aggregates, computes the same result, and keeps its rows of it; counted per op name and logged once.

Ordinary tensors are replicated (every rank holds the same); they are "rowed" when they carry the rows
(same row count, row dim leading): each member reads its rows of them, else all of them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.propagation import is_agg, mutates_first, never
from ms_splatfacto.backend.aggregate.redistribute import relayout, spread, to_plain_args
from ms_splatfacto.backend.aggregate.streams import member_streams
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, fusing, wrap

log = logging.getLogger(__name__)

Rule = Callable[[Any, tuple, dict], Any]
DECLINE = object()
"""Returned by a rule for arguments it does not cover; the op then takes the fallback."""

_RULES: Dict[Any, Optional[Rule]] = {}
_FALLBACKS: Counter = Counter()
_FAMILY_RULES: Dict[str, Rule] = {}
"""The rules the registry infers from an op's tags: "foreach", "pointwise" (set by the rule modules)."""


def register(*ops) -> Callable[[Rule], Rule]:
    """Register a rule for op overloads, or for every overload of an op packet."""

    def decorate(rule: Rule) -> Rule:
        for op in ops:
            overloads = [getattr(op, name) for name in op.overloads()] if hasattr(op, "overloads") else [op]
            for overload in overloads:
                _RULES[overload] = rule
        return rule

    return decorate


def register_family(name: str, rule: Rule) -> None:
    _FAMILY_RULES[name] = rule


def rule_for(func) -> Optional[Rule]:
    """The registered rule, else the family rule the op's tags or name imply (cached), else None."""
    if func not in _RULES:
        if func.name().startswith(("aten::_foreach_", "aten::_fused_adam")):  # fused Adam(W): a multi-tensor update
            _RULES[func] = _FAMILY_RULES["foreach"]
        elif torch.Tag.pointwise in func.tags:
            _RULES[func] = _FAMILY_RULES["pointwise"]
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


def run_local(
    func,
    args: tuple,
    kwargs: dict,
    layout: Layout,
    rowed: Callable[[torch.Tensor, Layout], bool] = never,
    sized: Optional[int] = None,
):
    """Run a row-local op once per local member on its rows and return results in `layout`.

    Aggregate arguments are brought to `layout`; ordinary tensors for which `rowed` holds are cut into
    the members' rows, others are read whole. `sized` is the position of a size argument whose first
    entry is the row count (view, expand, new_zeros), rewritten per member. Where `layout` allows
    fusing, the members' launches are one launch over the contiguous storage."""
    flat, spec = tree_flatten((args, kwargs))
    flat = [relayout(a, layout) if is_agg(a) else a for a in flat]
    is_rowed = [torch.is_tensor(a) and not is_agg(a) and rowed(a, layout) for a in flat]
    for a, r in zip(flat, is_rowed):
        if torch.is_tensor(a) and not is_agg(a):
            exchange.account_plain(a, layout, r)
    if fusing(layout) and all(a._whole is not None for a in flat if is_agg(a)):
        local_args, local_kwargs = tree_unflatten([a._whole if is_agg(a) else a for a in flat], spec)
        return _finish(func, args, {0: func(*local_args, **local_kwargs)}, layout, fused=True)
    cut = {i: exchange.rows_of(a, layout) for i, a in enumerate(flat) if is_rowed[i]}
    outs = {}
    streams = member_streams(layout.members)
    for d in layout.members.local:
        local = [a.chunks[d] if is_agg(a) else cut[i][d] if i in cut else exchange.to_member(a, d, layout) for i, a in enumerate(flat)]
        local_args, local_kwargs = tree_unflatten(local, spec)
        if sized is not None:
            size = list(local_args[sized])
            size[0] = layout.counts[d]
            local_args = (*local_args[:sized], size, *local_args[sized + 1 :])
        with streams.run(d):
            outs[d] = func(*local_args, **local_kwargs)
    streams.join()
    return _finish(func, args, outs, layout, fused=False)


def _finish(func, args: tuple, outs: Dict[int, Any], layout: Layout, fused: bool):
    """Wrap per-member outputs (one entry, on the whole storage, when fused) into aggregates."""
    if mutates_first(func) and args and is_agg(args[0]):
        return args[0]
    members = list(outs)
    leaves = {d: tree_flatten(o)[0] for d, o in outs.items()}
    spec = tree_flatten(outs[members[0]])[1]
    wrapped = []
    for i, t in enumerate(leaves[members[0]]):
        if not torch.is_tensor(t):
            wrapped.append(t)
        elif fused:
            wrapped.append(wrap(layout, whole=t))
        else:
            wrapped.append(wrap(layout, chunks=[leaves[d][i] if d in leaves else None for d in range(len(layout.members))]))
    return tree_unflatten(wrapped, spec)


def fallback(func, args, kwargs):
    """The one path for ops without a rule: every rank gathers every aggregate, computes the same
    result, writes mutated aggregates back and keeps its rows of tensor results. Counted and logged
    once per op."""
    name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
    if name not in _FALLBACKS:
        log.warning("aggregate tensor: no rule for %s; gathering to every rank (slow)", func)
    _FALLBACKS[name] += 1
    flat = tree_flatten((args, kwargs))[0]
    p_args, p_kwargs = to_plain_args(args, kwargs)
    out = func(*p_args, **p_kwargs)
    members = next(a for a in flat if is_agg(a)).members
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write and i < len(args) and is_agg(args[i]):
            args[i].copy_(p_args[i])
    if mutates_first(func) and is_agg(args[0]):
        return args[0]
    return tree_map(lambda t: spread(t, members) if torch.is_tensor(t) and t.dim() > 0 else t, out)


AggregateTensor._dispatcher = staticmethod(dispatch)
