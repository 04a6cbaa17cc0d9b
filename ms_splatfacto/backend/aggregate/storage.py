"""Storage of an aggregate tensor's rows, behind one small interface.

Where rows live follows the members: one ordinary tensor where all of this rank's members share a
device (`ContiguousStorage`: the CPU, virtual members of one GPU), else one ordinary allocation per
member on its own GPU (`PerMemberStorage`, the plain mode), or the managed mode's `ManagedStorage`.

Persistent and transient rows. Every allocation says whether its rows are *persistent*: model state
that outlives a training step (parameters, optimizer moments, densification statistics). The rule:
rows are persistent when the code that allocates them asks for it (`empty(..., persistent=True)`),
which it does exactly where state is made:
  - data placed on the device from outside: `aggregate()` / `parameter()`, checkpoint loads;
  - rows shaped after, or copied from, persistent rows: `*_like` factories and clones of them (the
    Adam moments torch.optim makes with `zeros_like`), and row selections, permutations and
    concatenations whose sources are persistent (densification's `param[order]`, `moment[src]`).
Everything else an op computes (pointwise results, reductions, kernel outputs, gradients, re-stripes
of transients) is transient. `is_persistent` tells which a tensor is, on any device, so the rule is
checked on the CPU. Only the managed mode makes the two differ in memory: persistent rows go to managed
memory (striped and page-aligned on several GPUs, one allocation on one GPU, oversubscribing into host
memory when a GPU is full), transients stay per member on torch's caching allocator, so the steady
state allocates no managed memory and PyTorch's memory statistics see every transient.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate.layout import Layout

_MARK = "_ms_splatfacto_persistent"
"""Attribute set on the (untyped) storage of persistent rows; views and chunks share their storage."""


def _mark(t: torch.Tensor) -> torch.Tensor:
    setattr(t.untyped_storage(), _MARK, True)
    return t


def mark_persistent(t: torch.Tensor) -> torch.Tensor:
    """Record that `t`'s storage holds persistent rows (for rows allocated elsewhere)."""
    return _mark(t)


def _marked(t: torch.Tensor) -> bool:
    return bool(getattr(t.untyped_storage(), _MARK, False))


def is_persistent(t) -> bool:
    """Whether aggregate `t`'s local rows were allocated as persistent (views of them included)."""
    local = [c for c in t.chunks if c is not None]
    return bool(local) and all(_marked(c) for c in local)


def chunks_of(whole: torch.Tensor, layout: Layout) -> List[Optional[torch.Tensor]]:
    """Each local member's rows of `whole` (this rank's rows, [local_rows, ...], on the members' one
    device) as views, None for the members of other ranks."""
    b, m = layout.bounds, layout.members
    assert m.single_device, f"one tensor holds the rows of members on one device, not of {m}"
    first = layout.local_span[0]
    out: List[Optional[torch.Tensor]] = [None] * len(m)
    for d in m.local:
        out[d] = whole.narrow(0, b[d] - first, b[d + 1] - b[d])
    return out


class Storage:
    """Allocates this rank's rows of a new aggregate tensor: returns (whole, chunks), `whole` being one
    tensor whose row ranges are the local chunks where the storage has one (else None); the chunks of
    other ranks' members are None. `persistent` rows are model state (see the module docstring)."""

    def empty(
        self, layout: Layout, row_shape: Sequence[int], dtype: torch.dtype, persistent: bool = False
    ) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
        raise NotImplementedError


class ContiguousStorage(Storage):
    """One tensor on the (single) device of the members; the chunks are views of it. Used on the CPU
    and for one GPU or virtual members of one GPU, where persistent rows in the managed mode are one
    managed allocation (host memory backs what the GPU cannot hold)."""

    def empty(self, layout, row_shape, dtype, persistent=False):
        m = layout.members
        shape = (layout.local_rows, *row_shape)
        if persistent and m.managed_memory:
            from ms_splatfacto.backend.cuda_storage import managed_empty

            whole = _mark(managed_empty(shape, dtype, m.device))
        else:
            whole = torch.empty(shape, dtype=dtype, device=m.device)
            if persistent:
                _mark(whole)
        return whole, chunks_of(whole, layout)


class PerMemberStorage(Storage):
    """Plain mode on several devices: one ordinary allocation per member on its own device."""

    def empty(self, layout, row_shape, dtype, persistent=False):
        m = layout.members
        chunks = [
            torch.empty((n, *row_shape), dtype=dtype, device=m.devices[d]) if m.is_local(d) else None
            for d, n in enumerate(layout.counts)
        ]
        if persistent:
            for c in chunks:
                if c is not None:
                    _mark(c)
        return None, chunks


class ManagedStorage(Storage):
    """Managed mode on several GPUs: persistent rows in one managed allocation per tensor, each member's
    chunk page-aligned, preferred on its GPU (or the host when it is full), accessible by every member
    GPU, and a tensor tagged with its member's device (`cuda_storage.managed_chunks`); transient rows
    per member, as in the plain mode. No whole: the padding between chunks makes them non-contiguous."""

    def empty(self, layout, row_shape, dtype, persistent=False):
        if not persistent:
            return PerMemberStorage().empty(layout, row_shape, dtype)
        from ms_splatfacto.backend.cuda_storage import managed_chunks

        m = layout.members
        local = managed_chunks(row_shape, dtype, [layout.counts[d] for d in m.local], [m.devices[d] for d in m.local])
        chunks: List[Optional[torch.Tensor]] = [None] * len(m)
        for d, c in zip(m.local, local):
            chunks[d] = _mark(c)
        return None, chunks


_STORAGES = {"contiguous": ContiguousStorage(), "per-member": PerMemberStorage(), "managed": ManagedStorage()}


def register_storage(name: str, storage: Storage) -> None:
    """Make another storage kind available."""
    _STORAGES[name] = storage


def storage_for(layout: Layout) -> Storage:
    """Contiguous storage where all members share one device; on several GPUs managed storage in the
    managed mode, one allocation per member in the plain mode."""
    m = layout.members
    if m.single_device:
        return _STORAGES["contiguous"]
    return _STORAGES["managed" if m.managed else "per-member"]


def prefetch(t, member: int, rows: Optional[torch.Tensor] = None) -> list:
    """Before `member`'s kernels read aggregate `t`: move the pages of the rows it will read (`rows`,
    [K] global row indices, e.g. the rows a tile plan sends it; None: its own chunk) to its GPU, one
    batched call on its current stream. Nothing to do (returns []) where `t`'s rows are not managed
    memory: the CPU, the plain mode, transients. Returns the (address, bytes) ranges prefetched."""
    m, layout = t.members, t._layout
    assert m.is_local(member), f"member {member} is held by rank {m.ranks[member]}, not this one"
    if not (m.managed_memory and is_persistent(t)):
        return []
    from ms_splatfacto.backend.cuda_storage import prefetch as prefetch_reads

    if rows is None:
        reads = [(t.chunks[member], None)]
    else:
        assert rows.dim() == 1, f"rows must be [K], got {tuple(rows.shape)}"
        rows = rows.detach().cpu().long()  # a plan is host data: it becomes addresses
        owners = layout.owners(rows)
        reads = [(t.chunks[d], rows[owners == d] - layout.bounds[d]) for d in m.local if bool((owners == d).any())]
    return prefetch_reads(reads, m.devices[member])
