"""`per_member`: run a differentiable function on each member's rows, keeping one local graph per member.

The operators' first stage (projection and spherical harmonics) touches only the Gaussians a member
owns, so each member runs the unchanged single-device kernels on its chunk views. Autograd sees one
node; its backward replays each member's local graph on that member's part of the incoming gradient,
so gradients land where the rows live and nothing crosses between members.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.redistribute import relayout
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, is_aggregate, wrap

MemberFn = Callable[..., Sequence[Tensor]]
"""fn(member, *row_chunks, *shared) -> outputs, each with the member's rows as its first dim."""


def rows_for(grad: Optional[Tensor], layout: Layout, d: int) -> Optional[Tensor]:
    """Member d's rows of a gradient arriving for an output in `layout` (aggregate or plain)."""
    if grad is None:
        return None
    if is_aggregate(grad):
        return relayout(grad, layout).chunks[d]
    b = layout.bounds
    return grad[b[d] : b[d + 1]]


class _PerMember(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: MemberFn, layout: Layout, n_rowed: int, track: bool, *inputs: Tensor):
        rowed, shared = inputs[:n_rowed], inputs[n_rowed:]
        needs = ctx.needs_input_grad[4 : 4 + n_rowed]
        ctx.layout, ctx.graphs = layout, []
        per_member: List[Sequence[Tensor]] = []
        for d in range(len(layout.members)):
            leaves = [x.chunks[d].detach().requires_grad_(track and need) for x, need in zip(rowed, needs)]
            local = [exchange.to_member(s.detach(), d, layout) for s in shared]
            with torch.set_grad_enabled(track):
                outs = tuple(fn(d, *leaves, *local))
            if track:
                ctx.graphs.append((leaves, outs))
            per_member.append(outs)
        results = tuple(wrap(layout, chunks=[o[i].detach() for o in per_member]) for i in range(len(per_member[0])))
        ctx.mark_non_differentiable(*[r for r in results if not r.is_floating_point()])
        return results

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        layout: Layout = ctx.layout
        n_rowed = len(ctx.graphs[0][0]) if ctx.graphs else 0
        chunk_grads: List[List[Optional[Tensor]]] = [[] for _ in range(n_rowed)]
        for d, (leaves, outs) in enumerate(ctx.graphs):
            pairs = [(o, rows_for(g, layout, d)) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
            wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            found = torch.autograd.grad(
                [o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs], allow_unused=True
            ) if pairs and wanted else [None] * len(wanted)
            by_input = dict(zip(wanted, found))
            for i, leaf in enumerate(leaves):
                g = by_input.get(i)
                chunk_grads[i].append(torch.zeros_like(leaf) if g is None else g)
        ctx.graphs = []
        rowed_grads = [
            wrap(layout, chunks=cg) if ctx.needs_input_grad[4 + i] else None for i, cg in enumerate(chunk_grads)
        ]
        n_shared = len(ctx.needs_input_grad) - 4 - n_rowed
        return (None, None, None, None, *rowed_grads, *([None] * n_shared))


def per_member(fn: MemberFn, rowed: Sequence[AggregateTensor], shared: Sequence[Tensor] = ()) -> Tuple[AggregateTensor, ...]:
    """Outputs of `fn` run on each member's rows of `rowed` (aggregates sharing one layout) and on the
    replicated `shared` tensors (e.g. cameras), as aggregates in that layout. Differentiable in `rowed`;
    `shared` tensors are read by every member (counted) but get no gradient."""
    layout = rowed[0]._layout
    assert all(x._layout == layout for x in rowed), "per_member needs its row inputs in one layout"
    for s in shared:
        exchange.account_plain(s, layout, rowed=False)
    track = torch.is_grad_enabled() and any(x.requires_grad for x in rowed)
    return _PerMember.apply(fn, layout, len(rowed), track, *rowed, *shared)
