"""The members of an aggregate device: parsed once from a spec, shared by every tensor on it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch

from ms_splatfacto.backend.devices import parse_devices

STORAGE_MODES = ("managed", "plain")
"""How rows live on several GPUs: one managed allocation per tensor (and managed op outputs through the
managed allocator), or one ordinary allocation per member. Members on one device ignore the mode."""


@dataclass(frozen=True)
class Members:
    """The member devices of one aggregate device, in stripe order (member d owns chunk d).

    Hashable and printed as its spec, so layouts can be cached per (rows, members). `align` is the row
    granule of chunk boundaries: 1 on the CPU (no pages to align to), larger where storage has pages.
    `storage` is one of STORAGE_MODES.
    """

    spec: str
    devices: Tuple[torch.device, ...]
    align: int = 1
    storage: str = "managed"

    def __str__(self) -> str:
        return self.spec

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def device(self) -> torch.device:
        """The device the aggregate tensor reports (member 0's), so `.to(it)` leaves tensors in place."""
        return self.devices[0]

    @functools.cached_property
    def single_device(self) -> bool:
        """All members are virtual members of one physical device (cpu:N, cuda:0*4): one launch can
        cover every chunk of a contiguous storage."""
        return all(d == self.devices[0] for d in self.devices)

    @property
    def managed(self) -> bool:
        """Whether rows live in managed memory: several distinct GPUs in the managed storage mode."""
        return self.storage == "managed" and self.devices[0].type == "cuda" and not self.single_device

    def holds(self, device: torch.device) -> bool:
        """Whether `device` is one of the members (a `.to(device)` onto it keeps the aggregate)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device in self.devices


@functools.lru_cache(maxsize=None)
def members(spec: str, storage: str = "managed") -> Members:
    """The Members for `spec` (one object per spec and storage mode); refuses bad specs with
    DeviceSpecError. Several GPUs in the managed mode install the managed allocator, which must happen
    before torch first uses CUDA (else ManagedAllocatorError says so; the plain mode needs nothing)."""
    if storage not in STORAGE_MODES:
        raise ValueError(f"Storage mode {storage!r} is not one of {', '.join(STORAGE_MODES)}")
    devices = tuple(parse_devices(spec))
    canonical = spec.strip().lower()
    m = Members(canonical, devices, align=1, storage=storage)
    if m.managed:
        from ms_splatfacto.backend.cuda_storage import install_managed_allocator

        install_managed_allocator(m.devices)
    return m
