"""The members of an aggregate device: parsed once from a spec, shared by every tensor on it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch

from ms_splatfacto.backend.devices import parse_devices


@dataclass(frozen=True)
class Members:
    """The member devices of one aggregate device, in stripe order (member d owns chunk d).

    Hashable and printed as its spec, so layouts can be cached per (rows, members). `align` is the row
    granule of chunk boundaries: 1 on the CPU (no pages to align to), larger where storage has pages.
    """

    spec: str
    devices: Tuple[torch.device, ...]
    align: int = 1

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

    def holds(self, device: torch.device) -> bool:
        """Whether `device` is one of the members (a `.to(device)` onto it keeps the aggregate)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device in self.devices


@functools.lru_cache(maxsize=None)
def members(spec: str) -> Members:
    """The Members for `spec` (one object per spec); refuses bad specs with DeviceSpecError."""
    devices = tuple(parse_devices(spec))
    canonical = spec.strip().lower()
    return Members(canonical, devices, align=1)
