"""The aggregate tensor: an ordinary-looking `torch.Tensor` whose rows are striped over the members.

Model and optimizer code keeps calling ordinary torch functions; `__torch_dispatch__` hands every aten
op to the dispatcher (`dispatch.py`, installed on import of the package), which runs it member by
member. Under torch.distributed a tensor knows the global layout but holds only its rank's rows. The tensor reports member 0's
device, so `module.to(that device)` leaves aggregate parameters in place; `.to()` onto a device that is
not a member (e.g. `.cpu()` of a CUDA aggregate, for export) returns an ordinary tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, List, Optional, Sequence, Union

import torch

from ms_splatfacto.backend.aggregate import exchange
from ms_splatfacto.backend.aggregate.layout import Layout, even_layout
from ms_splatfacto.backend.aggregate.members import Members, members
from ms_splatfacto.backend.aggregate.storage import chunks_of, storage_for

_FUSE = [True]


def fusing(layout: Layout) -> bool:
    """Whether ops on `layout` may run as one launch over contiguous storage (one rank, all members on
    one device) instead of one launch per member; tests switch it off to run the per-member path."""
    return _FUSE[0] and layout.members.single_device and layout.members.world_size == 1


@contextlib.contextmanager
def per_member_execution() -> Iterator[None]:
    """Run every op member by member even where members share a device (the CUDA multi-GPU path)."""
    previous, _FUSE[0] = _FUSE[0], False
    try:
        yield
    finally:
        _FUSE[0] = previous


class AggregateTensor(torch.Tensor):
    """Rows striped over members: member d holds rows [layout.bounds[d], layout.bounds[d+1]).

    `_whole` is one tensor holding this rank's rows where the storage has one (CPU, virtual GPU
    members); the per-member chunks are then row views of it, made on first use. Chunks of members
    of other ranks are None."""

    _layout: Layout
    _whole: Optional[torch.Tensor]
    _chunk_list: Optional[List[Optional[torch.Tensor]]]
    _dispatcher: ClassVar[Callable[[Any, tuple, dict], Any]]

    @staticmethod
    def __new__(cls, layout: Layout, whole: Optional[torch.Tensor] = None, chunks: Optional[Sequence[torch.Tensor]] = None):
        ref = whole if whole is not None else max((c for c in chunks if c is not None), key=lambda c: c.shape[0])
        shape = (layout.rows, *ref.shape[1:])
        strides = ref.stride()
        t = torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=strides, dtype=ref.dtype, device=layout.members.device, layout=ref.layout
        )
        t._layout = layout
        t._whole = whole
        t._chunk_list = list(chunks) if chunks is not None else None
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return cls._dispatcher(func, args, kwargs or {})

    @property
    def chunks(self) -> List[Optional[torch.Tensor]]:
        """Member d's rows ([count_d, ...] on member d's device) for this rank's members, else None."""
        if self._chunk_list is None:
            self._chunk_list = chunks_of(self._whole, self._layout)
        return self._chunk_list

    @property
    def members(self) -> Members:
        return self._layout.members

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"AggregateTensor[{self.members}, rows {list(self._layout.counts)}]({to_plain(self.detach())!r})"

    def numpy(self, *, force: bool = False):
        return to_plain(self.detach()).numpy(force=force)

    def tolist(self):
        return to_plain(self.detach()).tolist()

    def __reduce_ex__(self, protocol):
        """Pickled (torch.save) as an ordinary tensor in global row order, so checkpoints are
        independent of the member count and load with torch.load(weights_only=True)."""
        plain = to_plain(self.detach())
        if getattr(self, "_is_param", False):
            plain = torch.nn.Parameter(plain, requires_grad=self.requires_grad)
        return plain.__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        copy = self.detach().clone()
        if getattr(self, "_is_param", False):
            copy = torch.nn.Parameter(copy, requires_grad=self.requires_grad)
        memo[id(self)] = copy
        return copy


def is_aggregate(t: object) -> bool:
    return isinstance(t, AggregateTensor)


def wrap(layout: Layout, whole: Optional[torch.Tensor] = None, chunks: Optional[Sequence[torch.Tensor]] = None) -> AggregateTensor:
    return AggregateTensor(layout, whole, chunks)


class LocalRows:
    """Builds an aggregate from this rank's members' row blocks, put one member at a time.

    Where the layout fuses (one rank, members on one device) the blocks are copied into one whole
    tensor, each member's rows a row range of it, so the row-local ops that follow (autograd's, Adam's,
    the statistics') run as one launch over the local members instead of one per member; no member
    reads another's rows. A block is copied as it arrives, so a caller that drops its blocks holds at
    most one extra. One local member's block is its whole as it is (made contiguous); elsewhere each
    block is its member's chunk."""

    def __init__(self, layout: Layout):
        self.layout = layout
        m = layout.members
        self.fuse = fusing(layout) and len(m.local) > 1
        self.whole: Optional[torch.Tensor] = None
        self.chunks: List[Optional[torch.Tensor]] = [None] * len(m)

    def put(self, d: int, rows: torch.Tensor) -> None:  # rows: [counts[d], ...] of local member d
        layout = self.layout
        assert rows.shape[0] == layout.counts[d], f"member {d} has {layout.counts[d]} rows, got {rows.shape[0]}"
        if not self.fuse:
            self.chunks[d] = rows.contiguous()
            return
        if self.whole is None:
            self.whole = torch.empty((layout.local_rows, *rows.shape[1:]), dtype=rows.dtype, device=layout.members.device)
        first = layout.local_span[0]
        self.whole.narrow(0, layout.bounds[d] - first, layout.counts[d]).copy_(rows)

    def result(self) -> AggregateTensor:
        if self.fuse:
            assert self.whole is not None, "no member's rows were put"
            return wrap(self.layout, whole=self.whole)
        m = self.layout.members
        if fusing(self.layout) and len(m.local) == 1 and self.chunks[m.local[0]] is not None:
            return wrap(self.layout, whole=self.chunks[m.local[0]])
        return wrap(self.layout, chunks=self.chunks)


def aggregate(t: torch.Tensor, spec: Union[str, Members], persistent: bool = True) -> AggregateTensor:
    """An aggregate copy of the ordinary tensor `t` ([rows, ...], the same on every rank), rows striped
    evenly over the members of `spec` ("cpu:4", "cuda", a Members): each member copies its rows.
    Data placed on the device from outside is model state (`persistent`) unless the caller says not."""
    m = spec if isinstance(spec, Members) else members(spec)
    t = t.detach().to(m.device)
    layout = even_layout(t.shape[0], m)
    exchange.account_plain(t, layout, rowed=True)
    first, stop = layout.local_span
    whole, chunks = storage_for(layout).empty(layout, t.shape[1:], t.dtype, persistent=persistent)
    if whole is not None:
        whole.copy_(t[first:stop])
    else:
        for d in m.local:
            chunks[d].copy_(t[layout.bounds[d] : layout.bounds[d + 1]], non_blocking=True)
    return wrap(layout, whole, chunks)


def parameter(t: torch.Tensor, spec: Union[str, Members], requires_grad: bool = True) -> torch.nn.Parameter:
    """An `nn.Parameter` whose data is `aggregate(t, spec)` (still an AggregateTensor)."""
    return torch.nn.Parameter(aggregate(t, spec), requires_grad=requires_grad)


def to_plain(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor with all rows of `t` in global order on this rank's first member's device (a
    copy, the same on every rank: a collective under torch.distributed); ordinary tensors are
    returned as they are."""
    if not is_aggregate(t):
        return t
    layout = t._layout
    if layout.members.world_size == 1 and t._whole is not None:
        exchange.replicate_counts(layout, exchange.row_bytes(t))
        return t._whole.clone()
    return exchange.all_rows(t.chunks, layout, (t.shape[1:], t.dtype))


def restripe_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give plain optimizer state (e.g. after `optimizer.load_state_dict`, which keeps loaded tensors
    ordinary) the layout of its aggregate parameter, so moments live with their rows again."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if is_aggregate(p) and torch.is_tensor(value) and not is_aggregate(value) and value.shape == p.shape:
                    state[key] = aggregate(value, p.members)

