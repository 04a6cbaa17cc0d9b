"""Device specs: which devices hold the model (`--pipeline.model.devices`).

Accepted now: "auto" (the first GPU where one exists, else the CPU), "cpu", "cuda" (the current
GPU) and "cuda:N". Multi-member specs ("cpu:4", "cuda:0,1") arrive with the aggregate device.
"""

from __future__ import annotations

import re
from typing import List

import torch


class DeviceSpecError(ValueError):
    """A device spec that is malformed or cannot be met on this machine."""


def available_devices() -> List[str]:
    """What this machine offers, for error messages."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def parse_devices(spec: str) -> List[torch.device]:
    """The member devices named by `spec`, checked against this machine.

    Raises DeviceSpecError naming the problem and listing what is available.
    """
    text = spec.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return [torch.device("cpu")]
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceSpecError(
            f"Device spec {spec!r} is not understood; use 'auto', 'cpu', 'cuda' or 'cuda:N'. "
            f"Available here: {', '.join(available_devices())}."
        )
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match.group(1) is not None else 0
    if index >= count:
        raise DeviceSpecError(
            f"Device spec {spec!r} needs GPU {index} but this machine has {count} visible GPU(s). "
            f"Available here: {', '.join(available_devices())}."
        )
    return [torch.device("cuda", index)]

