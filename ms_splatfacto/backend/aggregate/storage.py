"""Storage of an aggregate tensor's rows, behind one small interface: one ordinary tensor where all
members share a device, else (several GPUs) one managed allocation striped over them (csrc/cuda) or,
in the plain mode, one ordinary allocation per member."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate.layout import Layout


def chunks_of(whole: torch.Tensor, layout: Layout) -> List[Optional[torch.Tensor]]:
    """Each local member's rows of `whole` (this rank's rows, [local_rows, ...]) as views, None for the
    members of other ranks; on several GPUs (managed `whole`) each view is tagged with its member's
    device, so ops on it run there."""
    b, m = layout.bounds, layout.members
    first = layout.local_span[0]
    out: List[Optional[torch.Tensor]] = [None] * len(m)
    for d in m.local:
        if m.single_device:
            out[d] = whole.narrow(0, b[d] - first, b[d + 1] - b[d])
        else:
            from ms_splatfacto.backend.cuda_storage import chunk_view

            out[d] = chunk_view(whole, b[d] - first, b[d + 1] - b[d], m.devices[d])
    return out


class Storage:
    """Allocates this rank's rows of a new aggregate tensor: returns (whole, chunks), `whole` being one
    tensor whose row ranges are the local chunks where the storage has one (else None); the chunks of
    other ranks' members are None."""

    def empty(
        self, layout: Layout, row_shape: Sequence[int], dtype: torch.dtype
    ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        raise NotImplementedError


class ContiguousStorage(Storage):
    """One ordinary tensor on the (single) device of the members; the chunks are views of it.
    Used on the CPU and for virtual members of one GPU."""

    def empty(self, layout, row_shape, dtype):
        whole = torch.empty((layout.local_rows, *row_shape), dtype=dtype, device=layout.members.device)
        return whole, chunks_of(whole, layout)


class PerMemberStorage(Storage):
    """Plain mode: one ordinary allocation per member on its own device (no managed memory)."""

    def empty(self, layout, row_shape, dtype):
        m = layout.members
        return None, [
            torch.empty((n, *row_shape), dtype=dtype, device=m.devices[d]) if m.is_local(d) else None
            for d, n in enumerate(layout.counts)
        ]


class ManagedStorage(Storage):
    """Several GPUs: one managed allocation per tensor, chunk d preferred on and prefetched to member
    d's GPU, every member GPU allowed to access all of it; the chunks are views tagged with their
    member's device (`cuda_storage.managed_striped_empty`, `chunk_view`)."""

    def empty(self, layout, row_shape, dtype):
        from ms_splatfacto.backend.cuda_storage import managed_striped_empty

        m = layout.members
        first = layout.local_span[0]
        local_bounds = [layout.bounds[d] - first for d in m.local] + [layout.local_rows]
        whole = managed_striped_empty([layout.local_rows, *row_shape], dtype, tuple(m.devices[d] for d in m.local), local_bounds)
        return whole, chunks_of(whole, layout)


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
