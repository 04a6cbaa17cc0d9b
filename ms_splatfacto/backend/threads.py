"""How many CPU threads a process may use: never more than the cores it may run on, shared among the
ranks of one machine.

A 2-thread step with another job holding one of 2 cores took 5.8x its quiet time: OpenMP threads wait
at every barrier for the one sharing its core. Using only the cores this process may run on
(`os.sched_getaffinity`, which containers and `taskset` narrow) and dividing them among the ranks
torchrun started on this machine (LOCAL_WORLD_SIZE) keeps threads from competing with each other;
an explicit OMP_NUM_THREADS (or `requested`) can lower the count, never raise it past the cores.

The threads also wait passively (OMP_WAIT_POLICY=PASSIVE, set by the package's `__init__` before torch
loads the OpenMP runtime, which reads it once): spinning threads sharing a core with another job made
a loaded step 5.8x slower. `wait_policy_note` says when the runtime started before the setting.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(cores: int, env: Mapping[str, str], requested: Optional[int] = None) -> int:
    """Threads for one process: its share of `cores` among the machine's local ranks, capped by
    `requested` or OMP_NUM_THREADS where given (at least 1)."""
    local_ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, cores // local_ranks)
    if requested is None and env.get("OMP_NUM_THREADS", "").strip().isdigit():
        requested = int(env["OMP_NUM_THREADS"])
    return max(1, min(share, requested)) if requested else share


def configure_threads(requested: Optional[int] = None) -> int:
    """Set torch's intra-op thread count (which our OpenMP kernels follow) to `choose_threads`; returns it."""
    threads = choose_threads(available_cores(), os.environ, requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def wait_policy_note(threads: int) -> Optional[str]:
    """A one-line hint where `threads` > 1 OpenMP threads may spin at barriers: torch loaded the OpenMP
    runtime before this package could ask for passive waiting (`ns-train` imports torch first) and the
    environment did not set OMP_WAIT_POLICY."""
    import ms_splatfacto

    if threads <= 1 or ms_splatfacto.WAIT_POLICY_APPLIED:
        return None
    return ("OpenMP threads spin while they wait (torch started before OMP_WAIT_POLICY was set): on a busy machine a step "
            "can take several times longer; `export OMP_WAIT_POLICY=PASSIVE` before ns-train avoids it.")
