"""Host syncs: the places where the host waits for device data, batched and counted.

On a GPU every read of device data on the host (`.item()`, `.tolist()`, `.cpu()`, `int(t)`, `bool(t)`)
waits for every kernel queued before it. The backend needs a few sizes on the host per phase (how many
intersections go to each member, how many records each source holds) before it can slice, so it reads
them for all of a rank's members at once with `read_ints`: one wait per phase, whatever the member count.

`HostSyncCounter` counts such reads made from ms-splatfacto code (torch's own host-side bookkeeping,
such as Adam's CPU step counter, is not device data). It is the CPU stand-in for
`torch.cuda.set_sync_debug_mode`, which sees every sync on a GPU (dynamic-shape ops included).
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping

import torch
from torch.overrides import TorchFunctionMode

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

HOST_READS = frozenset((
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
))
"""Tensor methods that hand device data to the host, so wait for the device."""


def read_ints(values: Mapping[int, torch.Tensor]) -> Dict[int, List[int]]:
    """`values[d].tolist()` for every entry ([k_d] integer tensors, one per local member, each on its
    member's device), read in one device-to-host copy: the tensors are gathered on the first one's
    device (asynchronous copies between GPUs) and read once."""
    keys = list(values)
    if not keys:
        return {}
    for d in keys:
        assert values[d].dim() == 1 and not values[d].is_floating_point(), f"member {d}: expected a [k] integer tensor"
    device = values[keys[0]].device
    flat = torch.cat([values[d].to(device, torch.long, non_blocking=True) for d in keys])
    numbers = flat.tolist()
    out, start = {}, 0
    for d in keys:
        k = values[d].shape[0]
        out[d] = numbers[start : start + k]
        start += k
    return out


class HostSyncCounter(TorchFunctionMode):
    """Counts host reads of tensor data (`HOST_READS`) whose caller is ms-splatfacto code, by call site.

        with HostSyncCounter() as syncs:
            step()
        syncs.total, syncs.sites  # {"tiles.py:153": 1, ...}
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = _first_outside_torch(traceback.extract_stack(limit=16)[:-1])
            if caller is not None and Path(caller.filename).resolve().is_relative_to(PACKAGE_ROOT):
                self.sites[f"{Path(caller.filename).name}:{caller.lineno}"] += 1
        return func(*args, **(kwargs or {}))


def _first_outside_torch(stack: List[traceback.FrameSummary]):
    """The innermost frame not in torch itself: who asked for the read."""
    torch_root = Path(torch.__file__).resolve().parent
    for frame in reversed(stack):
        if not Path(frame.filename).resolve().is_relative_to(torch_root):
            return frame
    return None
