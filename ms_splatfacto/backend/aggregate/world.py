"""The ranks of an SPMD run: torch.distributed's default process group, started from torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Without it there is one rank, and nothing here
needs torch.distributed to be usable."""

from __future__ import annotations

import datetime
import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 180.0
"""How long a collective waits for the other ranks before this rank stops (a rank that died or hangs)."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def identity() -> Tuple[int, int, int]:
    """(rank, world size, group id): what makes member lists of one process group distinct."""
    if not active():
        return (0, 1, 0)
    return (dist.get_rank(), dist.get_world_size(), id(dist.group.WORLD))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "") -> bool:
    """Join the process group torchrun describes in the environment (gloo on the CPU, NCCL with GPUs);
    a no-op when not launched by torchrun or already joined. Returns whether this is a multi-rank run."""
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() and os.environ.get("MS_SPLATFACTO_BACKEND") != "gloo" else "gloo")
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    return active()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (start-up metadata only; pickled)."""
    out: List[Any] = [None] * size()
    if not active():
        return [obj]
    dist.all_gather_object(out, obj)
    return out


def ranks_with(flag: bool) -> List[int]:
    """The ranks whose `flag` is true (every rank calls this; one all-reduce of [world size] ints, on the
    GPU where the process group is NCCL's)."""
    if not active():
        return [0] if flag else []
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.zeros(size(), dtype=torch.int32, device=device)
    flags[rank()] = int(flag)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]
