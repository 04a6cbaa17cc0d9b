"""The members of an aggregate device: parsed once from a spec, shared by every tensor on it.

A run is SPMD: every process (rank) names its own local members (`cpu:2`, `cuda`, ...), and the
aggregate device is every rank's members in rank order. Member d is held by rank `ranks[d]`; a rank
holds the rows of its own members only. Without torch.distributed there is one rank holding all."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ms_splatfacto.backend.aggregate import world
from ms_splatfacto.backend.devices import parse_devices

CPU_ROW_ALIGN = 128
"""Chunk boundaries of CPU members in separate processes fall on multiples of this many rows.
PyTorch's vectorised CPU loops compute a loop's scalar tail (exp, sigmoid, ...) with other roundings
than its vector body. CPU members of one process run row-local ops as one launch over all their rows,
so they keep the whole tensor's vector steps; ranks cannot, and a chunk starting at a multiple of 128
rows starts every dtype's vector loop (at most 2 x 64 B per step) where the whole tensor's loop would,
so ranks compute every row with the same bits as one member does."""

STORAGE_MODES = ("managed", "plain")
"""Where persistent rows (parameters, optimizer moments, statistics) live on GPUs: `plain`, one ordinary
allocation per member from torch's caching allocator; `managed`, managed memory from our extension
(striped over several GPUs, or one allocation on one GPU, which still lets a GPU oversubscribe into
host memory). Transient rows use torch's caching allocator in both (see `storage.py`). The managed
mode needs GPU members; nothing is installed process-wide."""


class StorageModeError(ValueError):
    """A storage mode the members cannot have (managed memory on CPU members)."""


@dataclass(frozen=True)
class Members:
    """The member devices of one aggregate device, in stripe order (member d owns chunk d).

    Hashable and printed as its spec, so layouts can be cached per (rows, members). `devices[d]` is
    member d's device on the rank holding it (`ranks[d]`); this process is rank `rank`. `align` is the
    row granule of chunk boundaries (see `row_align`). `storage` is one of STORAGE_MODES.
    """

    spec: str
    devices: Tuple[torch.device, ...]
    align: int = 1
    storage: str = "managed"
    ranks: Tuple[int, ...] = ()
    rank: int = 0

    def __post_init__(self) -> None:
        if not self.ranks:
            object.__setattr__(self, "ranks", (0,) * len(self.devices))

    def __str__(self) -> str:
        return self.spec

    def __len__(self) -> int:
        return len(self.devices)

    @functools.cached_property
    def local(self) -> Tuple[int, ...]:
        """The members this process holds (contiguous: ranks hold their members in rank order)."""
        return tuple(d for d, r in enumerate(self.ranks) if r == self.rank)

    def is_local(self, d: int) -> bool:
        return self.ranks[d] == self.rank

    @functools.cached_property
    def world_size(self) -> int:
        return max(self.ranks) + 1

    @functools.cached_property
    def hosts(self) -> Tuple[int, ...]:
        """Each rank's first member: where a rank keeps its ordinary (replicated) tensors."""
        return tuple(self.ranks.index(r) for r in range(self.world_size))

    @property
    def host(self) -> int:
        """This rank's first member."""
        return self.hosts[self.rank]

    @property
    def device(self) -> torch.device:
        """The device the aggregate tensor reports (this rank's first member's), so `.to(it)` leaves
        tensors in place; ordinary tensors of the model live there."""
        return self.devices[self.host]

    @functools.cached_property
    def single_device(self) -> bool:
        """This rank's members are virtual members of one physical device (cpu:N, cuda:0*4): one
        launch can cover every local chunk of a contiguous storage."""
        return all(self.devices[d] == self.device for d in self.local)

    @property
    def managed_memory(self) -> bool:
        """Whether persistent rows live in managed memory: the managed mode on GPUs (one or several)."""
        return self.storage == "managed" and self.device.type == "cuda"

    @property
    def managed(self) -> bool:
        """Whether persistent rows are striped over several GPUs in one managed allocation each."""
        return self.managed_memory and not self.single_device

    def holds(self, device: torch.device) -> bool:
        """Whether `device` is one of this rank's members (a `.to(device)` onto it keeps the aggregate)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return any(self.devices[d] == device for d in self.local)


def row_align(devices, world_size: int) -> int:
    """The row granule of chunk boundaries: CPU_ROW_ALIGN for CPU members on several ranks, else 1
    (one process fuses its CPU members' launches; GPU elementwise kernels have no scalar tail)."""
    return CPU_ROW_ALIGN if world_size > 1 and all(torch.device(d).type == "cpu" for d in devices) else 1


def members(spec: str, storage: str = "plain", align: Optional[int] = None) -> Members:
    """The Members for `spec` (one object per spec, storage mode and process group); refuses bad specs
    with DeviceSpecError. Under torch.distributed `spec` names this rank's members and every rank must
    call this together (the ranks' member lists are exchanged). The managed storage mode needs GPU
    members (refused with StorageModeError otherwise). `align` overrides the row granule of chunk
    boundaries (`row_align`), e.g. to lay one process out like ranks."""
    return _members(spec.strip().lower(), storage, world.identity(), align)


@functools.lru_cache(maxsize=None)
def _members(canonical: str, storage: str, identity: Tuple[int, int, int], align: Optional[int]) -> Members:
    if storage not in STORAGE_MODES:
        raise ValueError(f"Storage mode {storage!r} is not one of {', '.join(STORAGE_MODES)}")
    local = tuple(parse_devices(canonical))
    rank, size, _ = identity
    if size == 1:
        m = Members(canonical, local, align=align or row_align(local, size), storage=storage)
    else:
        per_rank = world.all_gather_object((canonical, [str(d) for d in local]))
        devices = tuple(torch.device(name) for _, names in per_rank for name in names)
        ranks = tuple(r for r, (_, names) in enumerate(per_rank) for _ in names)
        specs = [s for s, _ in per_rank]
        spec = f"{size} ranks x {canonical}" if len(set(specs)) == 1 else " + ".join(specs)
        m = Members(spec, devices, align=align or row_align(devices, size), storage=storage, ranks=ranks, rank=rank)
    if storage == "managed" and any(d.type != "cuda" for d in m.devices):
        raise StorageModeError(
            f"--pipeline.model.storage managed needs GPU members, and {m.spec!r} has CPU members; "
            "use --pipeline.model.storage plain (the default) on the CPU, or GPU members (--pipeline.model.devices cuda)"
        )
    return m
