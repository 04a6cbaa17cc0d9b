"""Run a function SPMD on several processes of this machine joined by torch.distributed (gloo on
loopback), one torch thread each: members in separate address spaces, as on separate GPUs or
machines. For tests and benchmarks; real runs start their ranks with torchrun."""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, target: Callable, args: tuple, out: str, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ms_splatfacto.backend.aggregate import world as spmd

    try:
        spmd.init_from_env(timeout_s=timeout_s)
        result = target(*args)
        torch.save({"ok": result}, out)
    except BaseException:  # the parent reports it with the rank
        torch.save({"error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ranks(world: int, target: Callable, *args: Any, tmp: Optional[Path] = None, timeout_s: float = 300) -> List[Any]:
    """`target(*args)` on `world` ranks; returns each rank's result in rank order, or raises naming the
    rank that failed. `target` must be a module-level function (ranks are spawned, not forked)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        outs = [str(Path(folder) / f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_child, args=(r, world, port, target, args, outs[r], min(timeout_s, 120))) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r, path in enumerate(outs):
            if not Path(path).exists():
                raise RuntimeError(f"rank {r} of {world} left no result (exit code {procs[r].exitcode})")
            got = torch.load(path, weights_only=False)
            if "error" in got:
                raise RuntimeError(f"rank {r} of {world} failed:\n{got['error']}")
            results.append(got["ok"])
    return results
