"""Device specs: which devices form the aggregate device (`--pipeline.model.devices`).

Accepted: "auto" (the first GPU where one exists, else the CPU), "cpu" (one member), "cpu:N" (N virtual
members on the CPU), "cuda" (every visible GPU), "cuda:N" / "cuda:0,1,3" (the GPUs named) and "cuda:0*4"
(four virtual members on GPU 0, so the multi-member CUDA path runs on a machine with one GPU).
A spec is parsed into a list of member devices, one entry per member (repeats mean virtual members).
"""

from __future__ import annotations

import re
from typing import List

import torch

SPEC_FORMS = "'auto', 'cpu', 'cpu:N', 'cuda', 'cuda:N', 'cuda:0,1,3' or 'cuda:0*4'"


class DeviceSpecError(ValueError):
    """A device spec that is malformed or cannot be met on this machine."""


def available_devices() -> List[str]:
    """What this machine offers, for error messages."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _refuse(spec: str, problem: str) -> DeviceSpecError:
    return DeviceSpecError(
        f"Device spec {spec!r} {problem}. Available here: {', '.join(available_devices())} "
        f"(and cpu:N for N virtual CPU members)."
    )


def parse_devices(spec: str) -> List[torch.device]:
    """The member devices named by `spec`, one per member, checked against this machine.

    Raises DeviceSpecError naming the problem and listing what is available.
    """
    text = spec.strip().lower()
    if text == "auto":
        text = "cuda:0" if torch.cuda.is_available() else "cpu"
    cpu = re.fullmatch(r"cpu(?::(\d+))?", text)
    if cpu is not None:
        count = int(cpu.group(1)) if cpu.group(1) is not None else 1
        if count < 1:
            raise _refuse(spec, "asks for no members; use cpu:N with N >= 1")
        return [torch.device("cpu")] * count
    cuda = re.fullmatch(r"cuda(?::(\d+(?:,\d+)*)(?:\*(\d+))?)?", text)
    if cuda is None:
        raise _refuse(spec, f"is not understood; use {SPEC_FORMS}")
    visible = torch.cuda.device_count()
    if cuda.group(1) is None:
        if visible == 0:
            raise _refuse(spec, "needs GPU 0 but this machine has 0 visible GPU(s)")
        return [torch.device("cuda", i) for i in range(visible)]
    indices = [int(i) for i in cuda.group(1).split(",")]
    repeat = int(cuda.group(2)) if cuda.group(2) is not None else 1
    if repeat < 1:
        raise _refuse(spec, "asks for no members; use cuda:I*K with K >= 1")
    if cuda.group(2) is not None and len(indices) > 1:
        raise _refuse(spec, f"is not understood; use {SPEC_FORMS}")
    if len(set(indices)) != len(indices):
        raise _refuse(spec, "names a GPU twice; use cuda:I*K for K virtual members on GPU I")
    missing = [i for i in indices if i >= visible]
    if missing:
        raise _refuse(spec, f"needs GPU {missing[0]} but this machine has {visible} visible GPU(s)")
    return [torch.device("cuda", i) for i in indices for _ in range(repeat)]
