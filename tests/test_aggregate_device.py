"""Members, layouts, the fallback counter and the exchange's byte counts of the aggregate device."""

from __future__ import annotations

import logging

import pytest
import torch

from ms_splatfacto.backend import DeviceSpecError, parse_devices
from ms_splatfacto.backend.aggregate import (
    aggregate,
    even_layout,
    exchange_counts,
    fallback_counts,
    is_aggregate,
    members,
    per_member_execution,
    reset_exchange,
    reset_fallback_counts,
    to_plain,
)

VISIBLE = torch.cuda.device_count()


def test_specs_name_members():
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices("cpu:4") == [torch.device("cpu")] * 4
    assert parse_devices(" CPU:1 ") == [torch.device("cpu")]
    m = members("cpu:7")
    assert len(m) == 7 and str(m) == "cpu:7" and m is members("cpu:7") and hash(m) == hash(members("cpu:7"))
    assert m.single_device and m.device == torch.device("cpu") and m.holds("cpu") and not m.holds("meta")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("cpu:0", "asks for no members"),
        ("cpu:0:1", "is not understood"),
        ("cpu:x", "is not understood"),
        ("gpu", "is not understood"),
        ("", "is not understood"),
        ("cuda:0,0", "names a GPU twice"),
        ("cuda:0,1*2", "is not understood"),
        (f"cuda:{VISIBLE}", f"has {VISIBLE} visible GPU"),
        (f"cuda:{VISIBLE},{VISIBLE + 1}", f"needs GPU {VISIBLE} but this machine has {VISIBLE} visible GPU"),
        (f"cuda:{VISIBLE}*4", f"has {VISIBLE} visible GPU"),
    ],
)
def test_bad_specs_are_refused_with_what_is_available(spec: str, message: str):
    with pytest.raises(DeviceSpecError) as error:
        parse_devices(spec)
    text = str(error.value)
    assert f"Device spec {spec!r}" in text and message in text and "Available here: cpu" in text


@pytest.mark.skipif(VISIBLE == 0, reason="no visible GPU on this machine")
def test_cuda_specs():
    assert parse_devices("cuda") == [torch.device("cuda", i) for i in range(VISIBLE)]
    assert parse_devices("cuda:0*4") == [torch.device("cuda", 0)] * 4
    assert members("cuda:0*4").single_device


@pytest.mark.parametrize("rows,n,expected", [(10, 4, (3, 3, 2, 2)), (0, 3, (0, 0, 0)), (2, 7, (1, 1, 0, 0, 0, 0, 0)), (10_000, 7, (1429,) * 4 + (1428,) * 3)])
def test_even_layouts_are_shared_and_contiguous(rows: int, n: int, expected):
    m = members(f"cpu:{n}")
    layout = even_layout(rows, m)
    assert layout.counts == expected and layout.bounds[-1] == rows and layout is even_layout(rows, m)
    a, b = aggregate(torch.zeros(rows, 2), m), aggregate(torch.ones(rows), m)
    assert a._layout is b._layout is layout
    whole = a._whole
    for d, chunk in enumerate(a.chunks):  # CPU storage: one tensor, members' chunks are views of it
        assert chunk.data_ptr() == whole[layout.bounds[d] :].data_ptr() or chunk.numel() == 0


def test_fallback_is_counted_and_logged_once(caplog):
    reset_fallback_counts()
    x0 = torch.randn(10, 3)
    x = aggregate(x0, "cpu:4")
    with caplog.at_level(logging.WARNING):  # ops without a rule
        first, second = torch.roll(x, 1, 0), torch.kthvalue(x, 2, 0).values
        third = torch.roll(x, 1, 0)
    assert is_aggregate(first) and first._layout.counts == (3, 3, 2, 2)
    assert torch.equal(to_plain(first), torch.roll(x0, 1, 0)) and torch.equal(to_plain(second), torch.kthvalue(x0, 2, 0).values)
    assert torch.equal(to_plain(third), torch.roll(x0, 1, 0))
    assert fallback_counts() == {"roll": 2, "kthvalue": 1}
    assert sum("no rule for aten.roll" in r.message for r in caplog.records) == 1
    reset_fallback_counts()
    assert fallback_counts() == {}


def test_fallback_writes_back_in_place_results():
    reset_fallback_counts()
    x0 = torch.randn(9, 2)
    x = aggregate(x0, "cpu:4")
    index, values = torch.tensor([0, 17]), torch.tensor([5.0, -5.0])
    with per_member_execution():
        x.put_(index, values)  # flat element writes across rows: no rule
    assert torch.equal(to_plain(x), x0.clone().put_(index, values)) and fallback_counts() == {"put_": 1}
    reset_fallback_counts()


@pytest.mark.parametrize("per_member", [False, True])
def test_exchange_counts_gather_and_restripe(per_member: bool):
    x = aggregate(torch.arange(20.0).view(10, 2), "cpu:4")  # rows 3,3,2,2; 8 bytes a row
    with per_member_execution() if per_member else torch.no_grad():
        reset_exchange()
        to_plain(x)
        assert exchange_counts() == {(1, 0): 24, (2, 0): 16, (3, 0): 16}

        y = aggregate(torch.arange(16.0).view(8, 2), "cpu:4")  # rows 2,2,2,2
        reset_exchange()
        keep = y[:, 0] < 12  # rows 0..5: members 0,1,2 keep 2 rows each -> 6 rows as 2,2,1,1
        selected = y[keep]
        assert exchange_counts() == {(2, 3): 8}  # member 2's second row moves to member 3
        assert selected._layout.counts == (2, 2, 1, 1)

        reset_exchange()
        both = torch.cat([y, y])  # 16 rows as 4,4,4,4: each source pair of rows lands whole
        assert both._layout.counts == (4, 4, 4, 4)
        assert exchange_counts() == {(1, 0): 16, (2, 1): 16, (3, 1): 16, (0, 2): 16, (1, 2): 16, (2, 3): 16}

        reset_exchange()
        y + 1.0, (y * y).sum(-1), y.sigmoid_()  # row-local: nothing moves
        assert exchange_counts() == {}
        y.sum(0)  # partials ([2] floats) travel to member 0
        assert exchange_counts() == {(1, 0): 8, (2, 0): 8, (3, 0): 8}


def test_storage_modes_pick_the_storage():
    """Several GPUs: managed storage in the managed mode, one allocation per member in the plain mode;
    members sharing a device always share one contiguous tensor (checked without a GPU: no allocation)."""
    from ms_splatfacto.backend.aggregate.members import Members
    from ms_splatfacto.backend.aggregate.storage import ContiguousStorage, ManagedStorage, PerMemberStorage, storage_for

    gpus = (torch.device("cuda", 0), torch.device("cuda", 1))
    managed, plain = Members("cuda:0,1", gpus), Members("cuda:0,1", gpus, storage="plain")
    assert managed.managed and not plain.managed
    assert isinstance(storage_for(even_layout(10, managed)), ManagedStorage)
    assert isinstance(storage_for(even_layout(10, plain)), PerMemberStorage)
    virtual = Members("cuda:0*4", (gpus[0],) * 4)
    assert not virtual.managed and isinstance(storage_for(even_layout(10, virtual)), ContiguousStorage)
    assert members("cpu:3", "plain").storage == "plain" and not members("cpu:3").managed
    with pytest.raises(ValueError, match="not one of managed, plain"):
        members("cpu:2", "unified")
