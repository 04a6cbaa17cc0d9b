"""`per_member`: run a differentiable function on each member's rows, keeping one local graph per member.

The operators' first stage (projection and spherical harmonics) touches only the Gaussians a member
owns, so each member (of this rank) runs the unchanged single-device kernels on its chunk views.
Autograd sees one node; its backward replays each member's local graph on that member's part of the
incoming gradient, so gradients land where the rows live and nothing crosses between members. The
replicated inputs every member reads (cameras) get the sum of the members' gradients, added in member
order on every rank.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout
from ms_splatfacto.backend.aggregate.redistribute import relayout
from ms_splatfacto.backend.aggregate.storage import prefetch
from ms_splatfacto.backend.aggregate.streams import member_streams
from ms_splatfacto.backend.aggregate.tensor import AggregateTensor, LocalRows, is_aggregate

MemberFn = Callable[..., Sequence[Tensor]]
"""fn(member, *row_chunks, *shared) -> outputs, each with the member's rows as its first dim (any
strides: they are copied once, into the members' whole where the layout fuses, else made contiguous)."""


def rows_for(grad: Optional[Tensor], layout: Layout, d: int) -> Optional[Tensor]:  # grad: [rows, ...]
    """Local member d's rows of a gradient arriving for an output in `layout` (an aggregate already in
    it, or an ordinary tensor)."""
    if grad is None:
        return None
    if is_aggregate(grad):
        return grad.chunks[d]
    b = layout.bounds
    return grad[b[d] : b[d + 1]]


class _PerMember(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: MemberFn, layout: Layout, n_rowed: int, track: bool, *inputs: Tensor):
        rowed, shared = inputs[:n_rowed], inputs[n_rowed:]
        needs = ctx.needs_input_grad[4:]
        ctx.layout, ctx.n_rowed, ctx.graphs = layout, n_rowed, []
        builders: List[LocalRows] = []
        streams = member_streams(layout.members)
        for d in layout.members.local:
            for x in rowed:  # managed rows: their pages on d's GPU before its kernels read them
                prefetch(x, d)
            leaves = [x.chunks[d].detach().requires_grad_(track and need) for x, need in zip(rowed, needs)]
            local = [
                exchange.to_member(s.detach(), d, layout).requires_grad_(track and need)
                for s, need in zip(shared, needs[n_rowed:])
            ]
            with torch.set_grad_enabled(track), streams.run(d):
                outs = tuple(fn(d, *leaves, *local))
                if not builders:
                    builders = [LocalRows(layout) for _ in outs]
                if not builders[0].fuse:  # the chunk is the graph's output itself (fused: a copy into the whole)
                    outs = tuple(o.contiguous() for o in outs)
            if track:  # the graph's ends, not the outputs: their [n, ...] storage is not held until backward
                ctx.graphs.append((d, leaves + local, [get_gradient_edge(o) if o.requires_grad else None for o in outs]))
            for builder, o in zip(builders, outs):
                builder.put(d, o.detach())
        streams.join()
        results = tuple(b.result() for b in builders)
        ctx.shared_like = [(tuple(s.shape), s.dtype) for s in shared]
        ctx.mark_non_differentiable(*[r for r in results if not r.is_floating_point()])
        return results

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        layout: Layout = ctx.layout
        m = layout.members
        n_rowed = ctx.n_rowed
        needs = ctx.needs_input_grad[4:]
        rowed_builders = [LocalRows(layout) for _ in range(n_rowed)]
        shared_parts: List[dict] = [{} for _ in ctx.shared_like]
        grads = tuple(relayout(g, layout) if is_aggregate(g) else g for g in grads)  # collective: once, not per member
        streams = member_streams(m)
        for d, leaves, outs in ctx.graphs:
            pairs = [(o, rows_for(g, layout, d)) for o, g in zip(outs, grads) if o is not None and g is not None]
            wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            with streams.run(d):
                found = torch.autograd.grad(
                    [o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs], allow_unused=True
                ) if pairs and wanted else [None] * len(wanted)
            by_input = dict(zip(wanted, found))
            del found
            for i, leaf in enumerate(leaves):
                g = by_input.pop(i, None)
                if not needs[i]:
                    continue
                g = torch.zeros_like(leaf) if g is None else g
                if i < n_rowed:
                    rowed_builders[i].put(d, g)  # fused: copied into the whole, this member's block dropped
                else:
                    shared_parts[i - n_rowed][d] = g.to(m.device)
                del g
        ctx.graphs = []
        streams.join()
        rowed_grads = [b.result() if needs[i] else None for i, b in enumerate(rowed_builders)]
        shared_grads = []
        for i, (shape, dtype) in enumerate(ctx.shared_like):
            if not needs[n_rowed + i]:
                shared_grads.append(None)
                continue
            parts = {d: shared_parts[i].get(d, torch.zeros(shape, dtype=dtype, device=m.device))[None] for d in m.local}
            every = exchange.replicate(m, parts, rows_per_member=[1] * len(m))
            total = every[0][0]
            for g in every[1:]:
                total = total + g[0]
            shared_grads.append(total)
        return (None, None, None, None, *rowed_grads, *shared_grads)


def per_member(fn: MemberFn, rowed: Sequence[AggregateTensor], shared: Sequence[Tensor] = ()) -> Tuple[AggregateTensor, ...]:
    """Outputs of `fn` run on each member's rows of `rowed` (aggregates sharing one layout) and on the
    replicated `shared` tensors (e.g. cameras), as aggregates in that layout. Differentiable in both:
    a `shared` tensor, read by every member (counted), gets the members' gradients summed in member
    order, the same on every rank."""
    layout = rowed[0]._layout
    assert all(x._layout == layout for x in rowed), "per_member needs its row inputs in one layout"
    for s in shared:
        exchange.account_plain(s, layout, rowed=False)
    track = torch.is_grad_enabled() and any(x.requires_grad for x in rowed)
    return _PerMember.apply(fn, layout, len(rowed), track, *rowed, *shared)
