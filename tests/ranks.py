"""Run a test function SPMD on several local ranks (see `ms_splatfacto.backend.aggregate.local_ranks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List

from ms_splatfacto.backend.aggregate.local_ranks import free_port, run_local_ranks

__all__ = ["free_port", "run_ranks"]


def run_ranks(world: int, target: Callable, *args: Any, tmp: Path, timeout: float = 300) -> List[Any]:
    """`target(*args)` on `world` ranks (gloo on loopback, one thread each); each rank's result."""
    try:
        return run_local_ranks(world, target, *args, tmp=tmp, timeout_s=timeout)
    except RuntimeError as err:
        raise AssertionError(str(err)) from None
