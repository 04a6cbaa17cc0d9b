"""Where results live (after DTensor's `_sharding_prop.py`): the layout an op's results take, which
ordinary operands carry the rows, and small schema helpers. No data moves here."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor


def is_agg(x: object) -> bool:
    return isinstance(x, AggregateTensor)


def bind(func, args: tuple, kwargs: dict) -> Dict[str, Any]:
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


def call_args(func, bound: Dict[str, Any]) -> Tuple[tuple, dict]:
    """Positional and keyword-only arguments for calling `func` from a name -> value binding."""
    args, kwargs = [], {}
    for a in func._schema.arguments:
        if a.kwarg_only:
            kwargs[a.name] = bound[a.name]
        else:
            args.append(bound[a.name])
    return tuple(args), kwargs


def mutates_first(func) -> bool:
    first = func._schema.arguments[0] if func._schema.arguments else None
    return first is not None and first.alias_info is not None and first.alias_info.is_write


def norm_dims(dim, ndim: int) -> Tuple[int, ...]:
    """Dims as non-negative ints; None or [] mean all dims."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return tuple(d % max(ndim, 1) for d in dims)


def target_layout(func, args: tuple, aggs: Sequence[AggregateTensor]) -> Layout:
    """The layout results take: the mutated argument's, else the first even one, else the first."""
    if mutates_first(func) and args and is_agg(args[0]):
        return args[0]._layout
    for a in aggs:
        if a._layout.is_even:
            return a._layout
    return aggs[0]._layout


def always(t: torch.Tensor, layout: Layout) -> bool:
    """An ordinary operand carries the rows when its leading dim is the row count."""
    return t.dim() > 0 and t.shape[0] == layout.rows


def never(t: torch.Tensor, layout: Layout) -> bool:
    return False


def members_with_rows(layout: Layout) -> List[int]:
    """The members holding at least one row (all ranks agree: the layout is global)."""
    return [d for d, n in enumerate(layout.counts) if n]
