"""Run a function SPMD in several processes joined by torch.distributed (gloo on loopback), one thread
each: members in separate address spaces, as on separate GPUs or machines."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable, List

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, target: Callable, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from ms_splatfacto.backend.aggregate import world as spmd

    try:
        spmd.init_from_env(timeout_s=60)
        result = target(*args)
        torch.save({"ok": result}, out)
    except BaseException:  # the parent reports it with the rank
        torch.save({"error": traceback.format_exc()}, out)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, target: Callable, *args: Any, tmp: Path, timeout: float = 300) -> List[Any]:
    """`target(*args)` on `world` ranks; returns each rank's result (rank order). `target` must be a
    module-level function (the ranks are spawned, not forked)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    outs = [str(tmp / f"rank{r}-{port}.pt") for r in range(world)]
    procs = [ctx.Process(target=_child, args=(r, world, port, target, args, outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = []
    for r, path in enumerate(outs):
        if not Path(path).exists():
            raise AssertionError(f"rank {r} of {world} left no result (exit code {procs[r].exitcode})")
        got = torch.load(path, weights_only=False)
        if "error" in got:
            raise AssertionError(f"rank {r} of {world} failed:\n{got['error']}")
        results.append(got["ok"])
    return results
