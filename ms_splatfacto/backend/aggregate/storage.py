"""Storage of an aggregate tensor's rows, behind one small interface: one ordinary tensor where all
members share a device, else (several GPUs) one managed allocation striped over them (csrc/cuda) or,
in the plain mode, one ordinary allocation per member."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate.layout import Layout


def chunks_of(whole: torch.Tensor, layout: Layout) -> List[torch.Tensor]:
    """Each member's rows of `whole` ([rows, ...]) as views; on several GPUs (managed `whole`) each view
    is tagged with its member's device, so ops on it run there."""
    b = layout.bounds
    if layout.members.single_device:
        return [whole.narrow(0, b[d], b[d + 1] - b[d]) for d in range(len(b) - 1)]
    from ms_splatfacto.backend.cuda_storage import chunk_view

    return [chunk_view(whole, b[d], b[d + 1] - b[d], device) for d, device in enumerate(layout.members.devices)]


class Storage:
    """Allocates the rows of a new aggregate tensor: returns (whole, chunks), `whole` being one tensor
    whose row ranges are the chunks where the storage has one (else None)."""

    def empty(
        self, layout: Layout, row_shape: Sequence[int], dtype: torch.dtype
    ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        raise NotImplementedError


class ContiguousStorage(Storage):
    """One ordinary tensor on the (single) device of the members; the chunks are views of it.
    Used on the CPU and for virtual members of one GPU."""

    def empty(self, layout, row_shape, dtype):
        whole = torch.empty((layout.rows, *row_shape), dtype=dtype, device=layout.members.device)
        return whole, chunks_of(whole, layout)


class PerMemberStorage(Storage):
    """Plain mode: one ordinary allocation per member on its own device (no managed memory)."""

    def empty(self, layout, row_shape, dtype):
        devices = layout.members.devices
        return None, [torch.empty((n, *row_shape), dtype=dtype, device=devices[d]) for d, n in enumerate(layout.counts)]


class ManagedStorage(Storage):
    """Several GPUs: one managed allocation per tensor, chunk d preferred on and prefetched to member
    d's GPU, every member GPU allowed to access all of it; the chunks are views tagged with their
    member's device (`cuda_storage.managed_striped_empty`, `chunk_view`)."""

    def empty(self, layout, row_shape, dtype):
        from ms_splatfacto.backend.cuda_storage import managed_striped_empty

        whole = managed_striped_empty([layout.rows, *row_shape], dtype, layout.members.devices, layout.bounds)
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
