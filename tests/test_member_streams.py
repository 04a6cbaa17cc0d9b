"""One stream per GPU member (`aggregate/streams.py`): members sharing a GPU get streams of their own,
work on them is ordered after what was queued before and joined before what follows. CPU members
have none, and the same per-member code runs unchanged."""

from __future__ import annotations

import pytest
import torch

from ms_splatfacto.backend.aggregate import aggregate, members, to_plain
from ms_splatfacto.backend.aggregate.streams import member_streams

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (member streams are CUDA streams)")


def test_cpu_members_have_no_streams_and_run_in_place():
    m = members("cpu:4")
    streams = member_streams(m)
    assert streams.streams == {} and member_streams(m) is streams
    x = aggregate(torch.arange(12.0).reshape(6, 2), m)
    order = []
    for d in m.local:
        with streams.run(d):
            order.append(d)
    streams.join()
    assert order == [0, 1, 2, 3]
    torch.testing.assert_close(to_plain(torch.exp(x)), torch.exp(torch.arange(12.0).reshape(6, 2)))


@needs_gpu
def test_members_sharing_a_gpu_get_a_stream_each_and_match_one_member():
    m = members("cuda:0*4")
    streams = member_streams(m)
    assert len({id(s) for s in streams.streams.values()}) == 4
    assert all(s != torch.cuda.current_stream(0) for s in streams.streams.values())
    plain = torch.randn(4096, 3, device="cuda:0")
    x = aggregate(plain, m)
    got = to_plain((torch.exp(x) * 2).sum(dim=1, keepdim=True))
    torch.testing.assert_close(got, (torch.exp(plain) * 2).sum(dim=1, keepdim=True))


@needs_gpu
def test_work_on_a_member_stream_waits_for_earlier_work_and_is_joined():
    m = members("cuda:0*2")
    streams = member_streams(m)
    a = torch.zeros(1 << 22, device="cuda:0")
    a += 1  # queued on the default stream
    with streams.run(1):
        b = a * 2  # must see a == 1
    streams.join()
    c = b + 1  # on the default stream, after the member's work
    assert torch.all(c == 3)
