"""Storage of an aggregate tensor's rows, behind one small interface so that the CUDA managed-memory
allocator (csrc/cuda) can plug in later beside the two kinds here."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ms_splatfacto.backend.aggregate.layout import Layout


def chunks_of(whole: torch.Tensor, layout: Layout) -> List[torch.Tensor]:
    """Each member's rows of `whole` ([rows, ...]) as views."""
    b = layout.bounds
    return [whole.narrow(0, b[d], b[d + 1] - b[d]) for d in range(len(b) - 1)]


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


_STORAGES = {"contiguous": ContiguousStorage(), "per-member": PerMemberStorage()}


def register_storage(name: str, storage: Storage) -> None:
    """Make another storage kind available (the managed-memory allocator registers "managed")."""
    _STORAGES[name] = storage


def storage_for(layout: Layout) -> Storage:
    """Contiguous storage where all members share one device, per-member allocations otherwise."""
    return _STORAGES["contiguous" if layout.members.single_device else "per-member"]
