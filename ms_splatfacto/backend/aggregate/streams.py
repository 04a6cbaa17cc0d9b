"""One CUDA stream per member, so members sharing a GPU (`cuda:0*4`) run side by side, not in turn.

Members on different GPUs already run concurrently: each device has its own default stream and the host
only launches. Members sharing a GPU would queue on its one default stream; here each local GPU member
works on a stream of its own for the duration of `member_streams(members).run(d)`:

    streams = member_streams(m)
    for d in m.local:
        with streams.run(d):   # d's stream first waits for everything queued before (inputs are ready)
            outs[d] = work(d)
    streams.join()             # each device's stream waits for its members' work (outputs are ready)

Every member's work starts by waiting for its device's current stream, so a block the caching allocator
hands back to a member stream is never overwritten while work queued earlier still reads it; and the
join makes later work wait for the members. On the CPU both are no-ops.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator

import torch


class MemberStreams:
    """The streams of one process's GPU members (none for CPU members)."""

    def __init__(self, members) -> None:
        self.members = members
        self.streams: Dict[int, "torch.cuda.Stream"] = {
            d: torch.cuda.Stream(device=members.devices[d]) for d in members.local if members.devices[d].type == "cuda"
        }
        self._used: set = set()

    @contextlib.contextmanager
    def run(self, d: int) -> Iterator[None]:
        """Member d's work: on its stream, after everything queued on its device's current stream."""
        stream = self.streams.get(d)
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        self._used.add(d)
        with torch.cuda.stream(stream):
            yield

    def join(self) -> None:
        """Make each device's current stream wait for the work of the members that ran since the last join."""
        for d in sorted(self._used):
            stream = self.streams[d]
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        self._used.clear()


@functools.lru_cache(maxsize=None)
def member_streams(members) -> MemberStreams:
    """The one MemberStreams of `members` in this process (streams are made once and reused)."""
    return MemberStreams(members)
